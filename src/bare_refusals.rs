//! hyper's own refusals, given the JSON body every other refusal has.
//!
//! A request whose line or headers cannot be read never reaches the relay's service:
//! hyper answers it itself, with a status and no body (`400` for a malformed line or
//! header, `431` past [`MOST_HEADER_BYTES`] or 100 headers, `414` for a
//! URI past 64 KB), and closes the connection. A caller then sees `431` and nothing that
//! says which limit it passed. hyper offers no way to choose that answer, so
//! [`Explained`] sits between hyper and the connection, recognises the one shape hyper
//! writes it in (the status line, `connection: close`, `content-length: 0`, `date`, and
//! nothing else: every answer of the relay's own carries a `content-type`), and writes in
//! its place the same answer with a `{"message": ...}` body.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes a request's line and headers may take, and so the most a connection holds
/// before they are read (hyper answers `431` beyond it). hyper's default, about 408 KB,
/// let anyone hold that much per connection: 500 connections each sending 400 KB of a
/// header without its end took the relay from 17 MB to 229 MB. nginx allows 32 KB in
/// all by default (`large_client_header_buffers 4 8k`); a webhook's headers take 1–3 KB.
pub const MOST_HEADER_BYTES: usize = 32 * 1024;

/// A connection whose bare refusals from hyper are explained (see the module's
/// documentation).
pub struct Explained<S> {
    inner: S,
    replacing: Option<Replacing>,
}

/// An explained answer on its way in place of a bare one.
struct Replacing {
    answer: Vec<u8>,
    written: usize,
    /// The bare answer's length: what hyper is told was written once all of `answer` is.
    stands_for: usize,
}

impl<S> Explained<S> {
    pub fn new(inner: S) -> Explained<S> {
        Explained {
            inner,
            replacing: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> Explained<S> {
    /// Writes the explained answer for `bytes` if they are a bare refusal (or the one
    /// under way), reporting `bytes` written once all of it is; `None` when they are
    /// anything else.
    fn poll_replace(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacing.is_none() {
            let answer = explain(bytes)?;
            self.replacing = Some(Replacing {
                answer,
                written: 0,
                stands_for: bytes.len(),
            });
        }
        let replacing = self.replacing.as_mut()?;
        while replacing.written < replacing.answer.len() {
            let left = &replacing.answer[replacing.written..];
            match Pin::new(&mut self.inner).poll_write(cx, left) {
                Poll::Ready(Ok(0)) => return Some(Poll::Ready(Ok(0))),
                Poll::Ready(Ok(n)) => replacing.written += n,
                Poll::Ready(Err(err)) => return Some(Poll::Ready(Err(err))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        let stands_for = replacing.stands_for;
        self.replacing = None;
        Some(Poll::Ready(Ok(stands_for)))
    }
}

/// The explained answer in place of `head` when it is one of hyper's bare refusals.
fn explain(head: &[u8]) -> Option<Vec<u8>> {
    // Cheap enough for every write: hyper's refusals are short and say `4xx` first.
    if head.len() > 256 || !head.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let code = status_line.get(9..12)?;
    let message = match code {
        "400" => "the request could not be read as HTTP/1.1: its request line or one of its headers is malformed".to_owned(),
        "414" => "the request's URI is too long".to_owned(),
        "431" => format!(
            "the request's line and headers take more than {} KiB, or it has more than 100 headers; a webhook's take 1-3 KB",
            MOST_HEADER_BYTES / 1024
        ),
        _ => return None,
    };
    if lines.next()? != "connection: close" || lines.next()? != "content-length: 0" {
        return None;
    }
    let date = lines.next()?.strip_prefix("date: ")?;
    if lines.next().is_some() {
        return None;
    }
    let body = serde_json::json!({ "message": message }).to_string();
    Some(
        format!(
            "{status_line}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Explained<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Explained<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(replaced) = this.poll_replace(cx, buf) {
            return replaced;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // A bare refusal is a head alone: one slice with something in it.
        let mut filled = bufs.iter().filter(|buf| !buf.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next())
            && let Some(replaced) = this.poll_replace(cx, only)
        {
            return replaced;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // An explained answer not yet all written goes before the end.
        if let Some(Poll::Pending) = this.poll_replace(cx, &[]) {
            return Poll::Pending;
        }
        this.replacing = None;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DATE: &str = "date: Sat, 05 Dec 2026 12:18:41 GMT";

    fn bare(status_line: &str) -> Vec<u8> {
        format!("{status_line}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n")
            .into_bytes()
    }

    fn message_of(answer: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len(), "{text}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\n{DATE}")), "{head}");
        (
            head.lines().next().unwrap().to_owned(),
            serde_json::from_str(body).unwrap(),
        )
    }

    #[test]
    fn each_bare_refusal_gets_its_reason() {
        for (line, says) in [
            ("HTTP/1.1 400 Bad Request", "could not be read as HTTP/1.1"),
            (
                "HTTP/1.1 431 Request Header Fields Too Large",
                "more than 32 KiB",
            ),
            ("HTTP/1.1 414 URI Too Long", "URI is too long"),
        ] {
            let answer = explain(&bare(line)).expect(line);
            let (status_line, body) = message_of(&answer);
            assert_eq!(status_line, line);
            assert!(body["message"].as_str().unwrap().contains(says), "{body}");
        }
    }

    /// Anything but the exact bare shape passes untouched: the relay's own answers (they
    /// carry a content type), a body, another status, a success.
    #[test]
    fn other_answers_are_left_alone() {
        let ours = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"
        );
        let with_body = [
            bare("HTTP/1.1 431 Request Header Fields Too Large"),
            b"x".to_vec(),
        ]
        .concat();
        for bytes in [
            ours.into_bytes(),
            with_body,
            bare("HTTP/1.1 404 Not Found"),
            bare("HTTP/1.1 200 OK"),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n{DATE}\r\n\r\n").into_bytes(),
            b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
        ] {
            assert_eq!(explain(&bytes), None, "{}", String::from_utf8_lossy(&bytes));
        }
    }

    /// Through a socket that takes a few bytes at a time: hyper is told its bare answer
    /// was written, the caller reads the explained one whole, then the end.
    #[tokio::test]
    async fn the_explained_answer_is_written_whole_however_the_socket_takes_it() {
        let (near, mut far) = tokio::io::duplex(7);
        let mut explained = Explained::new(near);
        let head = bare("HTTP/1.1 431 Request Header Fields Too Large");
        let reader = tokio::spawn(async move {
            let mut answer = Vec::new();
            far.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let told = explained.write(&head).await.unwrap();
        assert_eq!(told, head.len());
        explained.shutdown().await.unwrap();
        drop(explained);
        let answer = reader.await.unwrap();
        let (status_line, body) = message_of(&answer);
        assert_eq!(status_line, "HTTP/1.1 431 Request Header Fields Too Large");
        assert!(body["message"].as_str().unwrap().contains("100 headers"));
    }
}
