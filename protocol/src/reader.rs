//! [`FrameReader`]: the one place a byte stream becomes messages. The node's
//! sessions, the Rust client and the fuzz targets all read through it.
//!
//! It is sans-IO: the caller reads its socket however it likes, hands the
//! bytes to [`FrameReader::extend`], and takes whole messages out with
//! [`FrameReader::next_frame`] (one) or [`FrameReader::frames`] (every whole
//! frame already buffered, e.g. to hand a batch on). Each step is the shape
//! of mini-redis's `Connection::read_frame`: check that a whole frame is
//! buffered, parse it, advance past it. A frame may arrive split across any
//! number of deliveries, and one delivery may hold several frames.
//!
//! Bad frames are answered exactly as [`crate::decode_frame`] reports them
//! (PROTOCOL.md section 4): an error after which the reader has already
//! skipped the bad frame, so the next call goes on with the next one; or,
//! for a length prefix over `FRAME_BYTES_MAX`, [`DecodeError::FrameTooLarge`]
//! as soon as the 4 prefix bytes are in, after which the stream cannot be
//! resynchronised: the reader stops, keeps answering that error, and drops
//! whatever bytes it is given from then on.
//!
//! No IO, no async, no clock; the only allocation is the buffer, which holds
//! at most what was fed and not yet decoded.

use std::marker::PhantomData;

use crate::frame::{DecodeError, WireMessage, decode_frame};

/// Buffers a byte stream and decodes it into messages of one direction
/// (`M`: [`crate::ClientMessage`] on the node, [`crate::NodeMessage`] on a
/// client).
pub struct FrameReader<M> {
    /// Bytes received; those before `start` are decoded (or skipped) and
    /// dropped at the next [`FrameReader::extend`].
    buffer: Vec<u8>,
    /// Where the first undecoded byte is: always at a frame boundary.
    start: usize,
    /// Set once a length prefix was over the limit: the frame boundary after
    /// it is unknown, so nothing after it is ever decoded or kept.
    stopped: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M: WireMessage> Default for FrameReader<M> {
    fn default() -> FrameReader<M> {
        FrameReader::new()
    }
}

impl<M: WireMessage> FrameReader<M> {
    /// An empty reader.
    pub fn new() -> FrameReader<M> {
        FrameReader::with_capacity(0)
    }

    /// An empty reader whose buffer starts with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> FrameReader<M> {
        FrameReader {
            buffer: Vec::with_capacity(bytes),
            start: 0,
            stopped: false,
            _message: PhantomData,
        }
    }

    /// Appends bytes the transport delivered. Ignored once the reader has
    /// stopped ([`FrameReader::is_stopped`]).
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.stopped {
            return;
        }
        if self.start > 0 {
            // What is left is at most a partial frame when the caller decodes
            // between deliveries: a short copy.
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Decodes the next whole frame.
    ///
    /// `Ok(None)`: the next frame is not complete yet; feed more bytes.
    /// `Ok(Some(message))`: a validated message; the reader moved past it.
    /// `Err(error)`: the next frame is unusable. When
    /// [`DecodeError::frame_bytes`] is `Some`, the reader moved past it and
    /// the next call goes on with the following frame; when it is `None`
    /// (the length prefix is over the limit) the reader has stopped and every
    /// later call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<M>, DecodeError> {
        match decode_frame::<M>(self.buffered()) {
            Ok(None) => Ok(None),
            Ok(Some((message, consumed))) => {
                self.advance(consumed);
                Ok(Some(message))
            }
            Err(error) => {
                match error.frame_bytes() {
                    Some(skip) => self.advance(skip),
                    None => self.stopped = true,
                }
                Err(error)
            }
        }
    }

    /// Every whole frame already buffered, in order, as
    /// [`FrameReader::next_frame`] gives them; ends when more bytes are
    /// needed, and after the error that stops the reader.
    pub fn frames(&mut self) -> Frames<'_, M> {
        Frames { reader: self }
    }

    /// The bytes fed and not yet decoded, from a frame boundary: the start
    /// of a frame still arriving (or, once stopped, the oversized frame's
    /// prefix and what had arrived behind it).
    pub fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// True once a length prefix over the limit was met: the stream cannot
    /// go on and the caller should stop reading it.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    fn advance(&mut self, bytes: usize) {
        // `decode_frame` never names more bytes than it was given.
        self.start = (self.start + bytes).min(self.buffer.len());
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
    }
}

/// The iterator of [`FrameReader::frames`].
pub struct Frames<'reader, M> {
    reader: &'reader mut FrameReader<M>,
}

impl<M: WireMessage> Iterator for Frames<'_, M> {
    type Item = Result<M, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.reader.is_stopped() {
            return None;
        }
        self.reader.next_frame().transpose()
    }
}

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;
