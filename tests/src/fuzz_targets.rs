//! Fuzz targets for the frame codec and message decoding, shared by the
//! cargo-fuzz harness in `fuzz/` (long runs, coverage-guided, nightly) and
//! the bounded run in `tests/it/fuzz.rs` (every `cargo test`, stable).
//!
//! Each target takes arbitrary bytes and panics when the decoder breaks its
//! contract; a panic is a finding. None of them may loop or allocate beyond
//! a small multiple of its input: the in-test run counts allocations, and
//! libFuzzer's `-malloc_limit_mb`/`-timeout` watch the long runs.

use tapledger_protocol::examples::example_frames;
use tapledger_protocol::{
    ClientMessage, DecodeError, FRAME_BYTES_MAX, FRAME_HEADER_BYTES, FrameReader, NodeMessage,
    WireMessage, decode_frame, encode_frame, encode_frame_to_vec, split_frame,
};

/// What decoding one position of a stream gave: comparable across runs.
#[derive(Debug, PartialEq)]
pub enum Step<M> {
    Message(M, usize),
    /// The error code and how many bytes to skip (`None`: stream unusable).
    Error(u16, Option<usize>),
}

/// Decodes `stream` as the node and the client do, through
/// [`FrameReader`]: frame after frame, skipping bad frames where the error
/// allows it, stopping where it does not or where more bytes are needed.
/// Checks the decoder's contract at every step and returns the steps and the
/// bytes left undecoded.
pub fn decode_stream<M>(stream: &[u8]) -> (Vec<Step<M>>, usize)
where
    M: WireMessage + PartialEq + std::fmt::Debug,
{
    let mut reader = FrameReader::<M>::new();
    reader.extend(stream);
    decode_buffered(&mut reader)
}

/// Takes every whole frame out of `reader`, checking each step against the
/// bytes it had buffered; returns the steps and the bytes left in it.
fn decode_buffered<M>(reader: &mut FrameReader<M>) -> (Vec<Step<M>>, usize)
where
    M: WireMessage + PartialEq + std::fmt::Debug,
{
    let mut steps = Vec::new();
    while !reader.is_stopped() {
        let available = reader.buffered().len();
        let declared = reader
            .buffered()
            .first_chunk::<FRAME_HEADER_BYTES>()
            .map(|prefix| u32::from_be_bytes(*prefix) as usize);
        let decoded = reader.next_frame();
        let consumed = available - reader.buffered().len();
        match decoded {
            Ok(None) => {
                // Only an incomplete frame may ask for more bytes.
                if let Some(declared) = declared {
                    assert!(
                        available < FRAME_HEADER_BYTES + declared,
                        "a complete frame of {declared} bytes was not decoded"
                    );
                }
                assert_eq!(consumed, 0, "waiting for more bytes dropped some");
                break;
            }
            Ok(Some(message)) => {
                assert!(
                    consumed > FRAME_HEADER_BYTES && consumed <= available,
                    "consumed {consumed} of {available}"
                );
                assert!(message.validate().is_ok(), "decoded an invalid {message:?}");
                // A decoded message re-encodes to a frame that decodes to it
                // again, taking exactly that frame.
                let again = encode_frame_to_vec(&message).expect("a decoded message re-encodes");
                let (back, used) = decode_frame::<M>(&again)
                    .expect("a re-encoded message decodes")
                    .expect("a re-encoded message is complete");
                assert_eq!(back, message, "re-encoding changed the message");
                assert_eq!(used, again.len());
                steps.push(Step::Message(message, consumed));
            }
            Err(error) => {
                check_error(&error, declared, available);
                let skip = error.frame_bytes();
                assert_eq!(consumed, skip.unwrap_or(0), "{error:?}");
                assert_eq!(reader.is_stopped(), skip.is_none(), "{error:?}");
                steps.push(Step::Error(error.code().code(), skip));
            }
        }
    }
    (steps, reader.buffered().len())
}

/// Every error is a client's fault, carries a bounded text, and names a skip
/// inside the `available` bytes it was given, whose prefix declared
/// `declared` bytes.
fn check_error(error: &DecodeError, declared: Option<usize>, available: usize) {
    assert!(error.code().is_client_error(), "{error:?}");
    // Error texts go back to the peer and into logs: they stay short.
    assert!(
        error.to_string().len() <= 512,
        "{} bytes of error text",
        error.to_string().len()
    );
    let declared = declared.expect("an error needs at least a prefix");
    match error.frame_bytes() {
        Some(skip) => {
            assert!(skip >= FRAME_HEADER_BYTES && skip <= available, "{error:?}");
            assert_eq!(skip, FRAME_HEADER_BYTES + declared, "{error:?}");
        }
        None => assert!(
            declared > FRAME_BYTES_MAX,
            "{error:?} for a frame of {declared}"
        ),
    }
}

/// Target `client_frames`: the bytes as a stream a phone sent the node.
/// Also checks that delivering the same bytes in two pieces, cut where the
/// first byte says, decodes to exactly the same steps.
pub fn client_frames(data: &[u8]) {
    let whole = decode_stream::<ClientMessage>(data);
    if let Some(&first) = data.first() {
        let cut = usize::from(first) * data.len() / 256;
        assert_eq!(
            decode_in_two_deliveries::<ClientMessage>(data, cut),
            whole.0
        );
    }
}

/// Target `node_frames`: the bytes as a stream the node sent a phone.
pub fn node_frames(data: &[u8]) {
    let whole = decode_stream::<NodeMessage>(data);
    if let Some(&first) = data.first() {
        let cut = usize::from(first) * data.len() / 256;
        assert_eq!(decode_in_two_deliveries::<NodeMessage>(data, cut), whole.0);
    }
}

/// Decodes as a socket reader does when `stream` arrives as `..cut` then
/// `cut..`: one [`FrameReader`] fed both deliveries, every whole frame
/// taken out after each.
fn decode_in_two_deliveries<M>(stream: &[u8], cut: usize) -> Vec<Step<M>>
where
    M: WireMessage + PartialEq + std::fmt::Debug,
{
    let mut reader = FrameReader::<M>::new();
    let mut steps = Vec::new();
    for delivery in [&stream[..cut], &stream[cut..]] {
        reader.extend(delivery);
        steps.append(&mut decode_buffered(&mut reader).0);
    }
    steps
}

/// Target `split_frame`: the length-prefix layer on its own.
pub fn split(data: &[u8]) {
    let declared = data
        .first_chunk::<FRAME_HEADER_BYTES>()
        .map(|prefix| u32::from_be_bytes(*prefix) as usize);
    match (split_frame(data), declared) {
        (Ok(None), None) => {}
        (Ok(None), Some(declared)) => {
            assert!((1..=FRAME_BYTES_MAX).contains(&declared));
            assert!(data.len() < FRAME_HEADER_BYTES + declared);
        }
        (Ok(Some((body, consumed))), Some(declared)) => {
            assert_eq!(body.len(), declared);
            assert_eq!(consumed, FRAME_HEADER_BYTES + declared);
            assert_eq!(body, &data[FRAME_HEADER_BYTES..consumed]);
            assert!((1..=FRAME_BYTES_MAX).contains(&declared));
        }
        (Err(DecodeError::FrameTooLarge { declared: got }), Some(declared)) => {
            assert_eq!(got as usize, declared);
            assert!(declared > FRAME_BYTES_MAX);
        }
        (Err(DecodeError::EmptyFrame), Some(0)) => {}
        (result, declared) => panic!("split_frame gave {result:?} for a prefix of {declared:?}"),
    }
}

/// MessagePack fragments that stress decoders: extreme integers, negative
/// values where unsigned ones belong, huge declared lengths, deep nesting,
/// types the protocol never uses, and the protocol's own field names.
pub const DICTIONARY: &[&[u8]] = &[
    &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // u64::MAX
    &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0],                      // i64::MIN
    &[0xd1, 0xfc, 0x18],                                     // -1000
    &[0xff],                                                 // -1
    &[0xcb, 0x40, 0x59, 0, 0, 0, 0, 0, 0],                   // 100.0
    &[0xdd, 0xff, 0xff, 0xff, 0xff],                         // array of 2^32-1
    &[0xdf, 0xff, 0xff, 0xff, 0xff],                         // map of 2^32-1
    &[0xdb, 0xff, 0xff, 0xff, 0xff],                         // str of 2^32-1
    &[0xc6, 0xff, 0xff, 0xff, 0xff],                         // bin of 2^32-1
    &[0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91], // deep arrays
    &[0xc1],                                                 // never used
    &[0xd4, 0x01, 0x00],                                     // extension
    &[0xc0],                                                 // nil
    &[0x00],                                                 // 0 (limit, amount)
    &[0x33],                                                 // 51 (one over a page)
    &[0xcd, 0xff, 0xff],                                     // u16::MAX
    &[0xa3, b'a', 0x0a, b'b'],                               // "a\nb", not printable
    &[0xc2],                                                 // false
    &[0xa4, b't', b'y', b'p', b'e'],
    &[
        0xaa, b'r', b'e', b'q', b'u', b'e', b's', b't', b'_', b'i', b'd',
    ],
    &[0xa6, b'a', b'm', b'o', b'u', b'n', b't'],
    &[0xa9, b'd', b'e', b'v', b'i', b'c', b'e', b'_', b'o', b's'],
    &[0xa4, b'S', b'e', b'n', b'd'],
    &[0xa7, b'R', b'e', b'c', b'e', b'i', b'v', b'e'],
    &[
        0xab, b's', b'u', b'b', b'm', b'i', b't', b'_', b'h', b'a', b'l', b'f',
    ],
    &[0xa3, 0xe2, 0x82, 0xac], // "€"
    &[0xa2, 0xc3, 0x28],       // invalid UTF-8
];

/// Target `mutated_frames`: structured mutations of real frames. The first
/// byte picks one of the protocol's example frames; the rest is read as
/// mutation instructions (overwrite, insert, delete, splice in a dictionary
/// fragment, rewrite the length prefix, append another frame). The result
/// goes through both decoders and `split_frame`.
pub fn mutated_frames(data: &[u8]) {
    let frame = mutate(data);
    split(&frame);
    decode_stream::<ClientMessage>(&frame);
    decode_stream::<NodeMessage>(&frame);
}

/// The frame [`mutated_frames`] builds from `data`.
pub fn mutate(data: &[u8]) -> Vec<u8> {
    let frames = example_frames();
    let Some((&choice, mut ops)) = data.split_first() else {
        return Vec::new();
    };
    let mut frame = frames[usize::from(choice) % frames.len()].1.clone();
    let mut fix_prefix = true;
    while let [op, a, b, rest @ ..] = ops {
        ops = rest;
        let body_len = frame.len().saturating_sub(FRAME_HEADER_BYTES).max(1);
        let at = FRAME_HEADER_BYTES + (usize::from(*a) << 8 | usize::from(*b)) % body_len;
        let at = at.min(frame.len());
        match op % 8 {
            0 => {
                if let Some(byte) = frame.get_mut(at) {
                    *byte = *b;
                }
            }
            1 => frame.insert(at, *b),
            2 => {
                if at < frame.len() {
                    frame.remove(at);
                }
            }
            3 | 4 => {
                let fragment = DICTIONARY[usize::from(*b) % DICTIONARY.len()];
                frame.splice(at..at, fragment.iter().copied());
            }
            5 => {
                // Replace the value of a named field with a fragment: wrong
                // types, out-of-range numbers, bad strings.
                let key = FIELD_NAMES[usize::from(*a) % FIELD_NAMES.len()];
                let fragment = DICTIONARY[usize::from(*b) % DICTIONARY.len()];
                if let Some(value) = field_value(&frame, key) {
                    frame.splice(value, fragment.iter().copied());
                }
            }
            6 => {
                // A prefix that lies about the body.
                let declared = match b % 4 {
                    0 => 0,
                    1 => (FRAME_BYTES_MAX + 1) as u32,
                    2 => u32::MAX,
                    _ => (frame.len() - FRAME_HEADER_BYTES) as u32 ^ u32::from(*a),
                };
                frame[..FRAME_HEADER_BYTES].copy_from_slice(&declared.to_be_bytes());
                fix_prefix = false;
            }
            _ => {
                // Another frame follows (so the stream goes on).
                let next = &frames[usize::from(*b) % frames.len()].1;
                if fix_prefix {
                    set_prefix(&mut frame);
                }
                frame.extend_from_slice(next);
                return frame;
            }
        }
    }
    if fix_prefix {
        set_prefix(&mut frame);
    }
    frame
}

/// Field names of the protocol's messages, for [`field_value`].
pub const FIELD_NAMES: &[&str] = &[
    "type",
    "request_id",
    "amount",
    "expected_amount",
    "device_os",
    "limit",
    "api_key",
    "account_id",
    "tx_key",
    "sender_id",
    "receiver_id",
    "expected_sender_id",
    "salt",
    "key_hash",
    "opening_balance",
    "client_time",
    "bank_name",
    "account_type",
    "before_seq",
    "admin_credential",
    "code",
    "balance",
    "status",
];

/// Where the value of the first `key` (a MessagePack fixstr) in `frame`
/// lies, when that value is a scalar (containers are left alone).
pub fn field_value(frame: &[u8], key: &str) -> Option<std::ops::Range<usize>> {
    let mut needle = vec![0xa0 | key.len() as u8];
    needle.extend_from_slice(key.as_bytes());
    let start = frame
        .windows(needle.len())
        .position(|window| window == needle.as_slice())?
        + needle.len();
    let rest = frame.get(start..)?;
    let be = |bytes: usize| -> Option<usize> {
        let field = rest.get(1..1 + bytes)?;
        Some(
            field
                .iter()
                .fold(0usize, |value, byte| value << 8 | usize::from(*byte)),
        )
    };
    let len = match *rest.first()? {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 1,
        marker @ 0xa0..=0xbf => 1 + usize::from(marker & 0x1f),
        0xcc | 0xd0 => 2,
        0xcd | 0xd1 => 3,
        0xce | 0xd2 | 0xca => 5,
        0xcf | 0xd3 | 0xcb => 9,
        0xd9 | 0xc4 => 2 + be(1)?,
        0xda | 0xc5 => 3 + be(2)?,
        0xdb | 0xc6 => 5 + be(4)?,
        _ => return None,
    };
    (start + len <= frame.len()).then_some(start..start + len)
}

fn set_prefix(frame: &mut [u8]) {
    let body = (frame.len() - FRAME_HEADER_BYTES) as u32;
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&body.to_be_bytes());
}

/// A starting corpus: every example frame, two of them back to back, and
/// each with one dictionary fragment spliced into its body.
pub fn seed_inputs() -> Vec<Vec<u8>> {
    let frames = example_frames();
    let mut seeds: Vec<Vec<u8>> = frames.iter().map(|(_, frame)| frame.clone()).collect();
    let mut two = Vec::new();
    encode_frame(&ClientMessage::Balance { request_id: 1 }, &mut two).expect("fits");
    two.extend_from_slice(&frames[0].1);
    seeds.push(two);
    for (index, fragment) in DICTIONARY.iter().enumerate() {
        let mut frame = frames[index % frames.len()].1.clone();
        let at = FRAME_HEADER_BYTES + (frame.len() - FRAME_HEADER_BYTES) / 2;
        frame.splice(at..at, fragment.iter().copied());
        set_prefix(&mut frame);
        seeds.push(frame);
    }
    seeds
}
