//! Where the rows of a `COPY … TO STDOUT` stream end, so a table's data can be
//! cut into parts that each load on their own.
//!
//! Text COPY ends every row with `\n` (a newline inside a value is escaped as
//! `\n`, two bytes). Binary COPY is a signature and header, then tuples (a 16-bit
//! field count, then per field a 32-bit length, -1 for NULL, and that many bytes),
//! then a trailer (a field count of -1). Every binary part is written as a whole
//! stream of its own: [`BINARY_HEADER`], its tuples, [`BINARY_TRAILER`].

/// The header of a binary COPY stream that ferry writes: the signature, no
/// flags, an empty header extension.
pub const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The end of a binary COPY stream.
pub const BINARY_TRAILER: &[u8] = &[0xff, 0xff];
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// What [`Framing::scan`] found at the start of the unconsumed bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Rows {
    /// Bytes of stream header to drop first (binary, once).
    pub skip: usize,
    /// End of the last whole row: `buf[skip..end]` is whole rows.
    pub end: usize,
    /// Rows in `buf[skip..end]`.
    pub rows: u64,
    /// Bytes to drop after `end` (the binary trailer).
    pub trailer: usize,
}

/// Finds row boundaries in a COPY stream, text or binary.
#[derive(Debug)]
pub struct Framing {
    binary: bool,
    header_done: bool,
    ended: bool,
}

impl Framing {
    pub fn new(binary: bool) -> Self {
        Self {
            binary,
            header_done: !binary,
            ended: false,
        }
    }

    /// Scans `buf` (the bytes not consumed yet) for whole rows. With `last`, the
    /// stream has ended and `buf` must hold nothing but whole rows (and, binary,
    /// the trailer).
    pub fn scan(&mut self, buf: &[u8], last: bool) -> Result<Rows, String> {
        if !self.binary {
            let end = match buf.iter().rposition(|&b| b == b'\n') {
                _ if last => buf.len(),
                Some(i) => i + 1,
                None => 0,
            };
            return Ok(Rows {
                skip: 0,
                end,
                rows: bytecount::count(&buf[..end], b'\n') as u64,
                trailer: 0,
            });
        }
        let mut pos = 0;
        if !self.header_done {
            match header_len(buf)? {
                Some(n) => {
                    pos = n;
                    self.header_done = true;
                }
                None if last => return Err("the stream ended inside its header".into()),
                None => {
                    return Ok(Rows {
                        skip: 0,
                        end: 0,
                        rows: 0,
                        trailer: 0,
                    });
                }
            }
        }
        let skip = pos;
        let mut rows = 0;
        let mut trailer = 0;
        while !self.ended {
            match tuple_len(&buf[pos..])? {
                Some(Tuple::Row(n)) => {
                    pos += n;
                    rows += 1;
                }
                Some(Tuple::Trailer) => {
                    self.ended = true;
                    trailer = BINARY_TRAILER.len();
                }
                None => break,
            }
        }
        if last && (!self.ended || pos + trailer != buf.len()) {
            return Err(if self.ended {
                "bytes after the trailer".into()
            } else {
                "the stream ended inside a tuple, or without its trailer".into()
            });
        }
        Ok(Rows {
            skip,
            end: pos,
            rows,
            trailer,
        })
    }
}

/// The length of the stream header at the start of `buf`; `None` while incomplete.
fn header_len(buf: &[u8]) -> Result<Option<usize>, String> {
    if buf.len() < SIGNATURE.len() + 8 {
        return Ok(None);
    }
    if &buf[..SIGNATURE.len()] != SIGNATURE {
        return Err("no binary COPY signature".into());
    }
    let at = SIGNATURE.len();
    let flags = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    if flags & 0xffff_0000 != 0 {
        return Err(format!("unsupported header flags {flags:#x} (OIDs)"));
    }
    let ext = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]) as usize;
    let n = at + 8 + ext;
    Ok((buf.len() >= n).then_some(n))
}

enum Tuple {
    Row(usize),
    Trailer,
}

/// The tuple or trailer at the start of `buf`; `None` while incomplete.
fn tuple_len(buf: &[u8]) -> Result<Option<Tuple>, String> {
    let Some(count) = buf.get(..2) else {
        return Ok(None);
    };
    let count = i16::from_be_bytes([count[0], count[1]]);
    if count == -1 {
        return Ok(Some(Tuple::Trailer));
    }
    if count < 0 {
        return Err(format!("a tuple with {count} fields"));
    }
    let mut pos = 2;
    for _ in 0..count {
        let Some(len) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        pos += 4;
        if len > 0 {
            pos += len as usize;
        } else if len < -1 {
            return Err(format!("a field of length {len}"));
        }
    }
    Ok((buf.len() >= pos).then_some(Tuple::Row(pos)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary stream of `rows` tuples `(int4 i, text "x…" | NULL)`.
    fn stream(rows: i32) -> Vec<u8> {
        let mut s = BINARY_HEADER.to_vec();
        for i in 0..rows {
            s.extend_from_slice(&2i16.to_be_bytes());
            s.extend_from_slice(&4i32.to_be_bytes());
            s.extend_from_slice(&i.to_be_bytes());
            if i % 3 == 0 {
                s.extend_from_slice(&(-1i32).to_be_bytes());
            } else {
                let v = "x".repeat(i as usize);
                s.extend_from_slice(&(v.len() as i32).to_be_bytes());
                s.extend_from_slice(v.as_bytes());
            }
        }
        s.extend_from_slice(BINARY_TRAILER);
        s
    }

    /// Feeds `s` in `step`-byte chunks the way the reader does (keeping what is
    /// not whole) and returns the tuple bytes and the rows counted.
    fn feed(s: &[u8], step: usize) -> (Vec<u8>, u64) {
        let mut f = Framing::new(true);
        let (mut buf, mut out, mut rows) = (Vec::new(), Vec::new(), 0);
        for (k, chunk) in s.chunks(step).enumerate() {
            buf.extend_from_slice(chunk);
            let last = (k + 1) * step >= s.len();
            let r = f.scan(&buf, last).expect("valid stream");
            out.extend_from_slice(&buf[r.skip..r.end]);
            rows += r.rows;
            buf.drain(..r.end + r.trailer);
        }
        assert!(buf.is_empty());
        (out, rows)
    }

    #[test]
    fn binary_rows_are_found_whatever_the_chunking() {
        let s = stream(50);
        let body = &s[BINARY_HEADER.len()..s.len() - BINARY_TRAILER.len()];
        for step in [1, 2, 3, 7, 19, 20, 64, 4096] {
            assert_eq!(feed(&s, step), (body.to_vec(), 50), "step {step}");
        }
        assert_eq!(feed(&stream(0), 5), (Vec::new(), 0));
    }

    #[test]
    fn broken_binary_streams_are_refused() {
        let s = stream(4);
        let mut f = Framing::new(true);
        assert!(f.scan(&s[..s.len() - 1], true).is_err(), "no trailer");
        let mut f = Framing::new(true);
        assert!(f.scan(b"COPY\n\xff\r\n\0\0\0\0\0\0\0\0\0", true).is_err());
        let mut extra = s.clone();
        extra.push(0);
        let mut f = Framing::new(true);
        assert!(f.scan(&extra, true).is_err(), "bytes after the trailer");
    }

    #[test]
    fn text_rows_end_at_newlines() {
        let mut f = Framing::new(false);
        let r = f.scan(b"1\ta\n2\tb\n3", false).expect("text");
        assert_eq!((r.end, r.rows), (8, 2));
        let r = f.scan(b"3\tc\n", true).expect("text");
        assert_eq!((r.end, r.rows), (4, 1));
    }
}
