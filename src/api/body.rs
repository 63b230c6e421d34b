//! A request body that a layer in front of a service looks at as the service
//! reads it, frame by frame, without buffering it: the request size limit
//! (`limits`) and the copy kept for forwarding (`forward`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;

/// What a layer does with a request body as it passes.
pub trait Observer: Send + Unpin + 'static {
    /// Each data frame; an error ends the body with that status.
    fn data(&mut self, data: &Bytes) -> Result<(), Status>;
    /// The body has ended (its last frame read).
    fn ended(&mut self) {}
}

/// `body` as the service will read it, shown to `observer` on the way.
pub fn observed(body: Body, observer: impl Observer) -> Body {
    Body::new(Observed { body, observer })
}

struct Observed<O> {
    body: Body,
    observer: O,
}

impl<O: Observer> http_body::Body for Observed<O> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = self.observer.data(data) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                if self.body.is_end_stream() {
                    self.observer.ended();
                }
            }
            Poll::Ready(None) => self.observer.ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
