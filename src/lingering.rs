//! Closing a connection without destroying its last answer.
//!
//! A socket closed while the caller's bytes still wait unread in it is reset by the kernel,
//! and the reset can reach the caller before it has read the answer, which is then lost:
//! a `413` for a body refused by its declared length becomes "connection reset by peer".
//! As nginx's lingering close does, [`Lingering`] first shuts down the writing side (the
//! caller sees the answer and then the end), then reads and throws away what the caller
//! still sends until it stops, for at most [`LINGER`] and [`LINGER_BYTES`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest a closing connection reads what its caller still sends.
pub const LINGER: Duration = Duration::from_secs(2);
/// The most a closing connection reads and throws away.
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A connection whose shutdown lingers (see the module's documentation).
pub struct Lingering<S> {
    inner: S,
    closing: Closing,
}

enum Closing {
    Open,
    Draining {
        until: Pin<Box<tokio::time::Sleep>>,
        read: usize,
    },
    Closed,
}

impl<S> Lingering<S> {
    pub fn new(inner: S) -> Lingering<S> {
        Lingering {
            inner,
            closing: Closing::Open,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.closing {
                Closing::Open => {
                    let shut = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    if shut.is_err() {
                        this.closing = Closing::Closed;
                        return Poll::Ready(shut);
                    }
                    this.closing = Closing::Draining {
                        until: Box::pin(tokio::time::sleep(LINGER)),
                        read: 0,
                    };
                }
                Closing::Draining { until, read } => {
                    if until.as_mut().poll(cx).is_ready() || *read >= LINGER_BYTES {
                        this.closing = Closing::Closed;
                        continue;
                    }
                    let mut space = [0u8; 16 * 1024];
                    let mut buf = ReadBuf::new(&mut space);
                    match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                        Ok(()) if !buf.filled().is_empty() => *read += buf.filled().len(),
                        // The caller's end, or its reset: nothing more will come.
                        _ => this.closing = Closing::Closed,
                    }
                }
                Closing::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The server answers before reading a large request and closes: the caller, which
    /// sends all of it before reading, reads the whole answer and then the end, every time.
    #[tokio::test]
    async fn an_answer_sent_before_the_request_was_read_survives_the_close() {
        for _ in 0..20 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (socket, _) = listener.accept().await.unwrap();
                let mut socket = Lingering::new(socket);
                let mut head = [0u8; 64];
                let _ = socket.read(&mut head).await.unwrap();
                socket.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await.unwrap();
                socket.shutdown().await.unwrap();
            });
            let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
            let (mut reading, mut writing) = client.split();
            let send = async {
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..64 {
                    if writing.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = writing.shutdown().await;
            };
            let receive = async {
                let mut answer = Vec::new();
                reading.read_to_end(&mut answer).await.map(|_| answer)
            };
            // The caller sends everything before it looks for an answer, as a simple
            // client does.
            send.await;
            let answer = receive.await;
            let answer = answer.expect("the answer is read, not reset");
            assert!(answer.starts_with(b"HTTP/1.1 413"), "{answer:?}");
            server.await.unwrap();
        }
    }

    /// A caller that never stops sending does not hold the close open for ever.
    #[tokio::test]
    async fn lingering_ends_by_itself() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut near = Lingering::new(near);
        let writer = tokio::spawn(async move {
            let chunk = [b'x'; 512];
            while far.write_all(&chunk).await.is_ok() {}
        });
        tokio::time::timeout(LINGER * 5, near.shutdown())
            .await
            .expect("the linger ends")
            .unwrap();
        drop(near);
        writer.await.unwrap();
    }
}
