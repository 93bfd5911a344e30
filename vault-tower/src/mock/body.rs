//! `MockBody`: the mock provider's response body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A mock response body: frames handed out one per poll.
#[derive(Debug, Default)]
pub struct MockBody {
    frames: VecDeque<Bytes>,
}

impl MockBody {
    pub(super) fn new(frames: Vec<Bytes>) -> Self {
        MockBody {
            frames: frames.into(),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let n: usize = self.frames.iter().map(Bytes::len).sum();
        SizeHint::with_exact(n as u64)
    }
}
