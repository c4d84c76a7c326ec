//! Bounded capture of output: keep the last N bytes, count the rest.

use std::collections::VecDeque;

/// The tail of a byte stream, at most `cap` bytes.
#[derive(Debug)]
pub struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl Tail {
    /// An empty tail keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(cap.min(4096)),
            cap,
            dropped: 0,
        }
    }

    /// Appends `bytes`, discarding the oldest beyond the bound.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.cap == 0 {
            self.dropped += bytes.len() as u64;
            return;
        }
        let bytes = if bytes.len() > self.cap {
            let skip = bytes.len() - self.cap;
            self.dropped += skip as u64;
            &bytes[skip..]
        } else {
            bytes
        };
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.buf.drain(..overflow);
            self.dropped += overflow as u64;
        }
        self.buf.extend(bytes);
    }

    /// The kept text so far (lossy UTF-8), without the omitted-bytes note.
    pub fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Takes the text out, leaving an empty tail; see [`Tail::into_text`].
    pub fn take_text(&mut self) -> Option<String> {
        std::mem::replace(self, Tail::new(0)).into_text()
    }

    /// The kept text (lossy UTF-8), prefixed by how much was dropped;
    /// `None` when nothing was ever written.
    pub fn into_text(self) -> Option<String> {
        if self.buf.is_empty() && self.dropped == 0 {
            return None;
        }
        let (a, b) = self.buf.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        let text = String::from_utf8_lossy(&bytes);
        Some(if self.dropped > 0 {
            format!("[{} earlier bytes omitted]\n{text}", self.dropped)
        } else {
            text.into_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.into_text().unwrap(), "[2 earlier bytes omitted]\ncdefg");
        let mut t = Tail::new(3);
        t.push(b"0123456789");
        assert_eq!(t.into_text().unwrap(), "[7 earlier bytes omitted]\n789");
        assert_eq!(Tail::new(3).into_text(), None);
    }
}
