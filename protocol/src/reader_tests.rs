//! `FrameReader`: frames split across arbitrary deliveries, several frames in
//! one delivery, and every kind of bad frame answered with the error
//! `decode_frame` gives for it, skipped where the stream can go on and
//! stopping the reader where it cannot.

use proptest::prelude::*;

use super::*;
use crate::examples::{client_examples, example_send_half, node_examples};
use crate::frame::tests::{client_message, framed};
use crate::frame::{encode_frame, encode_frame_to_vec};
use crate::limits::{FRAME_BYTES_MAX, STRING_BYTES_MAX};
use crate::{ClientMessage, ErrorCode, Half, NodeMessage};

type Step = Result<ClientMessage, DecodeError>;

fn client_stream() -> (Vec<ClientMessage>, Vec<u8>) {
    let messages: Vec<ClientMessage> = client_examples().into_iter().map(|(_, m)| m).collect();
    let mut stream = Vec::new();
    for message in &messages {
        encode_frame(message, &mut stream).unwrap();
    }
    (messages, stream)
}

/// Feeds `deliveries` one after the other, taking every whole frame out
/// after each, as a socket reader does.
fn read_deliveries<'a>(deliveries: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Step>, usize) {
    let mut reader = FrameReader::<ClientMessage>::new();
    let mut steps = Vec::new();
    for delivery in deliveries {
        reader.extend(delivery);
        steps.extend(reader.frames());
    }
    (steps, reader.buffered().len())
}

/// What the node and the client did before the reader existed: decode at an
/// offset, skip by the error's frame length, stop at an unusable prefix.
fn reference_steps(stream: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut offset = 0;
    loop {
        match decode_frame::<ClientMessage>(&stream[offset..]) {
            Ok(None) => return steps,
            Ok(Some((message, used))) => {
                offset += used;
                steps.push(Ok(message));
            }
            Err(error) => {
                let skip = error.frame_bytes();
                steps.push(Err(error));
                match skip {
                    Some(skip) => offset += skip,
                    None => return steps,
                }
            }
        }
    }
}

#[test]
fn several_frames_in_one_delivery_come_out_one_by_one_in_order() {
    let (messages, stream) = client_stream();
    let mut reader = FrameReader::<ClientMessage>::new();
    reader.extend(&stream);
    for message in &messages {
        assert_eq!(reader.next_frame().unwrap().as_ref(), Some(message));
    }
    assert_eq!(reader.next_frame(), Ok(None));
    assert_eq!(reader.buffered().len(), 0);
    assert!(!reader.is_stopped());
}

#[test]
fn a_stream_cut_at_every_byte_decodes_the_same_messages() {
    let (messages, stream) = client_stream();
    for cut in 0..=stream.len() {
        let (steps, left) = read_deliveries([&stream[..cut], &stream[cut..]]);
        let decoded: Vec<ClientMessage> = steps.into_iter().map(Result::unwrap).collect();
        assert_eq!(decoded, messages, "cut at {cut}");
        assert_eq!(left, 0, "cut at {cut}");
    }
    let (steps, left) = read_deliveries(stream.chunks(1));
    assert_eq!(steps, messages.into_iter().map(Ok).collect::<Vec<_>>());
    assert_eq!(left, 0);
}

#[test]
fn a_partial_frame_waits_and_only_it_stays_buffered() {
    let first = encode_frame_to_vec(&ClientMessage::Balance { request_id: 1 }).unwrap();
    let second = encode_frame_to_vec(&ClientMessage::Balance { request_id: 2 }).unwrap();
    let mut reader = FrameReader::<ClientMessage>::new();
    reader.extend(&first);
    reader.extend(&second[..5]);
    assert_eq!(
        reader.next_frame(),
        Ok(Some(ClientMessage::Balance { request_id: 1 }))
    );
    assert_eq!(reader.next_frame(), Ok(None));
    assert_eq!(
        reader.buffered(),
        &second[..5],
        "the decoded frame is dropped"
    );
    reader.extend(&second[5..]);
    assert_eq!(
        reader.next_frame(),
        Ok(Some(ClientMessage::Balance { request_id: 2 }))
    );
    assert_eq!(reader.buffered().len(), 0);
}

#[test]
fn an_oversized_prefix_is_refused_from_its_four_bytes_and_stops_the_reader() {
    let declared = (FRAME_BYTES_MAX + 1) as u32;
    let prefix = declared.to_be_bytes();
    let mut reader = FrameReader::<ClientMessage>::new();
    reader.extend(&prefix[..3]);
    assert_eq!(reader.next_frame(), Ok(None));
    reader.extend(&prefix[3..]);
    let error = reader.next_frame().unwrap_err();
    assert_eq!(error, DecodeError::FrameTooLarge { declared });
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
    assert_eq!(error.frame_bytes(), None);
    assert!(reader.is_stopped());

    // Nothing after it is decoded or kept: the next frame boundary is unknown.
    let valid = encode_frame_to_vec(&ClientMessage::Balance { request_id: 3 }).unwrap();
    reader.extend(&valid);
    assert_eq!(reader.buffered(), &prefix[..]);
    assert_eq!(
        reader.next_frame(),
        Err(DecodeError::FrameTooLarge { declared })
    );
    assert_eq!(reader.frames().count(), 0);
}

#[test]
fn frames_yields_what_precedes_an_oversized_prefix_then_its_error_then_ends() {
    let mut stream = encode_frame_to_vec(&ClientMessage::Balance { request_id: 1 }).unwrap();
    stream.extend_from_slice(&u32::MAX.to_be_bytes());
    encode_frame(&ClientMessage::Balance { request_id: 2 }, &mut stream).unwrap();
    let (steps, _) = read_deliveries([&stream[..]]);
    assert_eq!(
        steps,
        vec![
            Ok(ClientMessage::Balance { request_id: 1 }),
            Err(DecodeError::FrameTooLarge { declared: u32::MAX }),
        ]
    );
}

/// One frame of each skippable kind, then a good one.
fn bad_frames_then_a_good_one() -> Vec<Vec<u8>> {
    let unknown_type = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([(
        "type",
        "transfer_all",
    )]))
    .unwrap();
    let mut long_os = example_send_half();
    long_os.device_os = "x".repeat(STRING_BYTES_MAX + 1).into();
    vec![
        vec![0, 0, 0, 0],
        framed(&[0xc1, 0xff, 0x00]),
        framed(&unknown_type),
        encode_frame_to_vec(&ClientMessage::SubmitHalf {
            request_id: 41,
            half: Half::Send(long_os),
        })
        .unwrap(),
        encode_frame_to_vec(&ClientMessage::Balance { request_id: 8 }).unwrap(),
    ]
}

#[test]
fn bad_frames_get_the_errors_decode_frame_gives_and_are_skipped() {
    let frames = bad_frames_then_a_good_one();
    let stream = frames.concat();
    let (steps, left) = read_deliveries([&stream[..]]);
    assert_eq!(left, 0);
    let codes: Vec<Option<ErrorCode>> = steps
        .iter()
        .map(|step| step.as_ref().err().map(DecodeError::code))
        .collect();
    assert_eq!(
        codes,
        [
            Some(ErrorCode::Malformed),
            Some(ErrorCode::Malformed),
            Some(ErrorCode::UnknownMessage),
            Some(ErrorCode::InvalidField),
            None,
        ]
    );
    // Each error is exactly the one the frame on its own decodes to.
    for (step, frame) in steps.iter().zip(&frames) {
        match decode_frame::<ClientMessage>(frame) {
            Err(error) => assert_eq!(step, &Err(error)),
            Ok(decoded) => assert_eq!(step, &Ok(decoded.unwrap().0)),
        }
    }
    assert_eq!(steps[3].as_ref().unwrap_err().request_id(), Some(41));
    // Delivered a byte at a time, the same steps.
    assert_eq!(read_deliveries(stream.chunks(1)).0, steps);
    assert!(!FrameReader::<ClientMessage>::new().is_stopped());
}

#[test]
fn a_node_reader_decodes_node_messages_and_refuses_client_ones() {
    let mut reader = FrameReader::<NodeMessage>::new();
    let messages: Vec<NodeMessage> = node_examples().into_iter().map(|(_, m)| m).collect();
    for message in &messages {
        reader.extend(&encode_frame_to_vec(message).unwrap());
    }
    reader.extend(&encode_frame_to_vec(&ClientMessage::Balance { request_id: 6 }).unwrap());
    let steps: Vec<_> = reader.frames().collect();
    let (decoded, refused) = steps.split_at(messages.len());
    assert_eq!(
        decoded
            .iter()
            .cloned()
            .map(Result::unwrap)
            .collect::<Vec<_>>(),
        messages
    );
    assert_eq!(
        refused[0].as_ref().unwrap_err().code(),
        ErrorCode::UnknownMessage
    );
    assert_eq!(refused.len(), 1);
}

/// A piece of a test stream: a valid frame, a frame around arbitrary body
/// bytes (mostly malformed), or arbitrary bytes (a lying prefix, say).
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => client_message().prop_map(|message| encode_frame_to_vec(&message).unwrap()),
        2 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(|body| framed(&body)),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_split_of_any_stream_gives_the_steps_of_decoding_it_whole(
        pieces in proptest::collection::vec(piece(), 0..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let stream = pieces.concat();
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut deliveries = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            deliveries.push(&stream[from..cut]);
            from = cut;
        }
        let (whole, whole_left) = read_deliveries([&stream[..]]);
        let (split, split_left) = read_deliveries(deliveries);
        prop_assert_eq!(&split, &whole);
        let stopped = matches!(whole.last(), Some(Err(error)) if error.frame_bytes().is_none());
        if !stopped {
            // Once stopped, a reader drops later deliveries: only then may
            // the bytes left differ.
            prop_assert_eq!(split_left, whole_left);
        }
        prop_assert_eq!(whole, reference_steps(&stream));
    }
}
