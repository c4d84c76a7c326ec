//! Problem bodies for requests the HTTP parser refuses before any handler
//! sees them (a bare CR, a NUL in a header, conflicting `Content-Length`,
//! a URI or header block too large). hyper answers those itself with an
//! empty body and no hook; this connection wrapper recognises such an
//! answer — a 4xx head with `connection: close` and `content-length: 0`,
//! which no handler of this service produces (every 4xx it sends carries a
//! problem document) — and gives it the problem+json body every other
//! error has.
//!
//! It also closes connections gracefully ("lingering close"): when the
//! server ends a connection whose request body it did not read (a 413, a
//! 408), closing at once would make the kernel reset it and the client
//! could lose the answer it was sent. The stream shuts its sending side,
//! then reads and discards what the client still sends, for at most
//! [`LINGER`] and [`LINGER_BYTES`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Longest a closing connection drains what the client still sends.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Most bytes a closing connection drains.
pub const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// A listener whose connections answer parser errors with problems.
pub struct ProblemListener(pub TcpListener);

impl axum::serve::Listener for ProblemListener {
    type Io = ProblemStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (ProblemStream, std::net::SocketAddr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (
            ProblemStream {
                inner: stream,
                pending: None,
                linger: None,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

/// A connection; see the module documentation.
pub struct ProblemStream {
    inner: TcpStream,
    /// A rewritten answer being written, how much of it is out, and the
    /// length of the original it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
    /// While closing: the drain's deadline and the bytes drained.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

/// The problem document for a status the parser answered with.
fn problem(status: u16) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match status {
        400 => (
            "urn:cronguard:problem:malformed-request",
            "Malformed request",
            "the request is not valid HTTP/1.1 (a bare CR or a NUL in a header, conflicting Content-Length, an invalid method or version)",
        ),
        414 => (
            "urn:cronguard:problem:uri-too-long",
            "URI too long",
            "the request target is longer than the server accepts",
        ),
        431 => (
            "urn:cronguard:problem:headers-too-large",
            "Request headers too large",
            "the request's header block is larger than the server accepts",
        ),
        _ => return None,
    })
}

/// `head` with a problem body if it is the parser's bodyless error answer.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let end = text.find("\r\n\r\n")?;
    if end + 4 != text.len() {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    if !(lower.contains("\r\nconnection: close\r\n") && lower.contains("\r\ncontent-length: 0\r\n")) {
        return None;
    }
    let (kind, title, detail) = problem(status)?;
    let body =
        serde_json::json!({"type": kind, "title": title, "status": status, "detail": detail}).to_string();
    let at = lower.find("\r\ncontent-length: 0\r\n")?;
    let mut out = String::with_capacity(text.len() + body.len() + 64);
    out.push_str(&text[..at]);
    out.push_str(&format!(
        "\r\ncontent-type: application/problem+json\r\ncontent-length: {}",
        body.len()
    ));
    out.push_str(&text[at + "\r\ncontent-length: 0".len()..]);
    out.push_str(&body);
    Some(out.into_bytes())
}

impl AsyncRead for ProblemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProblemStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match rewrite(buf) {
                Some(bytes) => this.pending = Some((bytes, 0, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        // Write the whole rewritten answer, then report the original as
        // written.
        while let Some((bytes, written, original)) = &mut this.pending {
            if *written == bytes.len() {
                let original = *original;
                this.pending = None;
                return Poll::Ready(Ok(original));
            }
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(0))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let Some((deadline, drained)) = &mut this.linger else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        loop {
            if deadline.as_mut().poll(cx).is_ready() || *drained >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    // Plain writes only: hyper then hands over a response head in one
    // buffer, which is what `rewrite` recognises.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parsers_bodyless_errors_get_a_problem() {
        let head = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 08:36:25 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(head).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/problem+json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("date: Wed"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], 400);
        assert_eq!(v["type"], "urn:cronguard:problem:malformed-request");
    }

    #[test]
    fn answers_of_the_service_pass_untouched() {
        for head in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: 10\r\n\r\n{\"a\":1234}"[..],
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"{\"status\": 400}",
        ] {
            assert!(rewrite(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }
}
