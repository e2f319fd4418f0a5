//! The name a new connection's first bytes announce: the server name (SNI) of a TLS
//! ClientHello, or the `Host` header of an HTTP/1 request. Both parsers look at a prefix of
//! the stream and say whether it is enough; neither terminates TLS or answers anything.
//!
//! A hand-written ClientHello reader rather than a TLS crate: the one field needed sits behind
//! a few length-prefixed vectors, and the crates that parse a ClientHello without a TLS
//! session (`tls-parser`) bring a parser-combinator stack for it. Every length is checked
//! against what is there before it is used.

/// What a prefix of a connection says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Peek {
    /// The announced name, lowercase, without a trailing dot or a port.
    Name(String),
    /// A whole message was read and it names no server (a ClientHello without SNI, an HTTP
    /// request without `Host`).
    NoName,
    /// Not enough bytes yet.
    Incomplete,
    /// Not what the port carries, or ambiguous (two names): refused.
    Invalid,
}

/// TLS record and handshake types.
const HANDSHAKE_RECORD: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME_EXT: u16 = 0;
const HOST_NAME: u8 = 0;
/// The most a record's payload may be (RFC 8446, 5.1).
const MAX_RECORD: usize = 1 << 14;

/// A checked reader over a byte slice: every take fails instead of reading past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self { rest }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    /// A vector with a `len_bytes`-byte length in front.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let len = match len_bytes {
            1 => usize::from(self.u8()?),
            2 => usize::from(self.u16()?),
            _ => self.u24()?,
        };
        self.take(len)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// A host name as it may appear in SNI or `Host`: letters, digits, `-`, `_` and `.`, 1 to 253
/// characters once a trailing dot is dropped. Anything else (an IP literal passes, and then
/// matches no domain) is refused rather than guessed at.
fn host_name(raw: &[u8]) -> Peek {
    let Ok(s) = std::str::from_utf8(raw) else {
        return Peek::Invalid;
    };
    let s = s.strip_suffix('.').unwrap_or(s);
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Peek::Name(s.to_ascii_lowercase())
    } else {
        Peek::Invalid
    }
}

/// The SNI of the TLS ClientHello that `data` starts with. The handshake message may span
/// several records (a large key share); they are joined first.
pub(crate) fn tls_sni(data: &[u8]) -> Peek {
    let mut records = Reader::new(data);
    let mut handshake = Vec::new();
    let mut need: Option<usize> = None;
    loop {
        if let Some(n) = need
            && handshake.len() >= n
        {
            break;
        }
        if records.rest.len() < 5 {
            return Peek::Incomplete;
        }
        let Some((ty, major, len)) = (|| {
            let ty = records.u8()?;
            let major = records.u8()?;
            let _minor = records.u8()?;
            Some((ty, major, usize::from(records.u16()?)))
        })() else {
            return Peek::Incomplete;
        };
        if ty != HANDSHAKE_RECORD || major != 3 || len == 0 || len > MAX_RECORD {
            return Peek::Invalid;
        }
        let Some(payload) = records.take(len) else {
            return Peek::Incomplete;
        };
        handshake.extend_from_slice(payload);
        if need.is_none() && handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Peek::Invalid;
            }
            let len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            need = Some(4 + len);
        }
    }
    let Some(n) = need else {
        return Peek::Incomplete;
    };
    client_hello_sni(&handshake[4..n]).unwrap_or(Peek::Invalid)
}

/// The SNI of a ClientHello body (RFC 8446, 4.1.2; RFC 6066, 3); `None` if it is malformed.
fn client_hello_sni(body: &[u8]) -> Option<Peek> {
    let mut r = Reader::new(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session = r.vec(1)?;
    if session.len() > 32 {
        return None;
    }
    let suites = r.vec(2)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    r.vec(1)?; // compression methods
    if r.is_empty() {
        // SSL 3.0-style: no extensions at all.
        return Some(Peek::NoName);
    }
    let mut exts = Reader::new(r.vec(2)?);
    if !r.is_empty() {
        return None;
    }
    let mut found: Option<Peek> = None;
    while !exts.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec(2)?;
        if ty != SERVER_NAME_EXT {
            continue;
        }
        if found.is_some() {
            // Two server_name extensions: which one a server reads is not ours to guess.
            return None;
        }
        let mut list = Reader::new(data);
        let mut names = Reader::new(list.vec(2)?);
        if !list.is_empty() {
            return None;
        }
        let mut host: Option<Peek> = None;
        while !names.is_empty() {
            let kind = names.u8()?;
            let name = names.vec(2)?;
            if kind == HOST_NAME {
                if host.is_some() {
                    return None;
                }
                host = Some(host_name(name));
            }
        }
        found = Some(host.unwrap_or(Peek::NoName));
    }
    Some(found.unwrap_or(Peek::NoName))
}

/// The `Host` of the HTTP/1 request that `data` starts with. Only origin-form targets
/// (`/path`, or `*`) are taken: an absolute-form target (`GET http://x/`) names the host
/// itself and would override `Host` at the server, and CONNECT names another destination.
pub(crate) fn http_host(data: &[u8]) -> Peek {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Peek::Incomplete,
        Err(_) => return Peek::Invalid,
    }
    let origin_form = req
        .path
        .is_some_and(|p| p.starts_with('/') || (p == "*" && req.method == Some("OPTIONS")));
    if !origin_form || req.method == Some("CONNECT") {
        return Peek::Invalid;
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        // None (HTTP/1.0 may omit it), or two: ambiguous.
        return match req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("host"))
        {
            true => Peek::Invalid,
            false => Peek::NoName,
        };
    };
    let value = host.value.trim_ascii();
    // `name:port`; a bracketed IPv6 literal is no name.
    let name = match value.iter().rposition(|b| *b == b':') {
        Some(i) if value[i + 1..].iter().all(u8::is_ascii_digit) => &value[..i],
        Some(_) => return Peek::Invalid,
        None => value,
    };
    host_name(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello (TLS 1.2 record framing) carrying `extensions`.
    pub(crate) fn client_hello(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // no session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(extensions.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, MAX_RECORD)
    }

    /// `hs` cut into handshake records of at most `size` bytes.
    pub(crate) fn records(hs: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[HANDSHAKE_RECORD, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A server_name extension with `names` (type, name) entries.
    pub(crate) fn sni_ext(names: &[(u8, &str)]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, n) in names {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(n.len()).unwrap_or(0).to_be_bytes());
            list.extend_from_slice(n.as_bytes());
        }
        let mut data = u16::try_from(list.len())
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        let mut ext = SERVER_NAME_EXT.to_be_bytes().to_vec();
        ext.extend_from_slice(&u16::try_from(data.len()).unwrap_or(0).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    /// Another extension (supported_versions), to sit around the SNI.
    fn other_ext() -> Vec<u8> {
        vec![0, 43, 0, 3, 2, 3, 4]
    }

    #[test]
    fn a_client_hellos_sni_is_found() {
        let mut exts = other_ext();
        exts.extend(sni_ext(&[(0, "Allowed.TEST.")]));
        exts.extend(other_ext());
        let hello = client_hello(&exts);
        assert_eq!(tls_sni(&hello), Peek::Name("allowed.test".into()));
        // Trailing bytes (the client's next flight) do not matter.
        let mut more = hello.clone();
        more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(tls_sni(&more), Peek::Name("allowed.test".into()));
    }

    #[test]
    fn every_truncation_is_incomplete_never_a_name_or_a_panic() {
        let hello = client_hello(&sni_ext(&[(0, "allowed.test")]));
        for n in 0..hello.len() {
            assert_eq!(tls_sni(&hello[..n]), Peek::Incomplete, "cut at {n}");
        }
    }

    #[test]
    fn a_hello_across_records_is_joined() {
        let mut exts = sni_ext(&[(0, "allowed.test")]);
        // A big extension (a post-quantum key share's size) before the name.
        let mut pad = vec![0, 21];
        pad.extend_from_slice(&1500u16.to_be_bytes());
        pad.extend_from_slice(&[0; 1500]);
        pad.extend(exts);
        exts = pad;
        let one = client_hello(&exts);
        // Re-frame the same handshake message in 100-byte records.
        let hs = &one[5..];
        let split = records(hs, 100);
        assert_eq!(tls_sni(&split), Peek::Name("allowed.test".into()));
        for n in [0, 5, 104, 105, 110, split.len() - 1] {
            assert_eq!(tls_sni(&split[..n]), Peek::Incomplete, "cut at {n}");
        }
    }

    #[test]
    fn no_sni_and_malformed_hellos() {
        assert_eq!(tls_sni(&client_hello(&other_ext())), Peek::NoName);
        assert_eq!(tls_sni(&client_hello(&[])), Peek::NoName);
        // Only a non-host_name entry.
        assert_eq!(tls_sni(&client_hello(&sni_ext(&[(1, "x")]))), Peek::NoName);
        // Two host names, or two server_name extensions: ambiguous.
        assert_eq!(
            tls_sni(&client_hello(&sni_ext(&[(0, "a.test"), (0, "b.test")]))),
            Peek::Invalid
        );
        let mut two = sni_ext(&[(0, "a.test")]);
        two.extend(sni_ext(&[(0, "b.test")]));
        assert_eq!(tls_sni(&client_hello(&two)), Peek::Invalid);
        // A name with a character no host name has, or empty.
        assert_eq!(
            tls_sni(&client_hello(&sni_ext(&[(0, "a.test\0.evil")]))),
            Peek::Invalid
        );
        assert_eq!(tls_sni(&client_hello(&sni_ext(&[(0, "")]))), Peek::Invalid);
        // An extension whose length runs past the list.
        let mut bad = sni_ext(&[(0, "allowed.test")]);
        bad[3] += 1;
        assert_eq!(tls_sni(&client_hello(&bad)), Peek::Invalid);
        // Not a handshake record, not a ClientHello, an oversized record.
        assert_eq!(tls_sni(b"GET / HTTP/1.1\r\n"), Peek::Invalid);
        let mut not_hello = client_hello(&sni_ext(&[(0, "a.test")]));
        not_hello[5] = 2;
        assert_eq!(tls_sni(&not_hello), Peek::Invalid);
        assert_eq!(tls_sni(&[22, 3, 1, 0x40, 0x01]), Peek::Invalid);
        assert_eq!(tls_sni(&[22, 3, 1, 0, 0]), Peek::Invalid);
    }

    #[test]
    fn an_oversized_hello_never_completes_within_the_peek_limit() {
        // Claims 1 MiB: stays Incomplete, so the proxy's byte limit refuses it.
        let mut hs = vec![CLIENT_HELLO, 0x10, 0, 0];
        hs.extend_from_slice(&[0; 16000]);
        let data = records(&hs, MAX_RECORD);
        assert_eq!(tls_sni(&data), Peek::Incomplete);
    }

    #[test]
    fn an_http_requests_host_is_found() {
        let req = b"GET / HTTP/1.1\r\nUser-Agent: t\r\nHOST: Allowed.Test:8080\r\n\r\n";
        assert_eq!(http_host(req), Peek::Name("allowed.test".into()));
        assert_eq!(
            http_host(b"POST /x HTTP/1.1\r\nHost: allowed.test\r\n\r\nbody"),
            Peek::Name("allowed.test".into())
        );
        for n in 0..req.len() {
            assert_eq!(http_host(&req[..n]), Peek::Incomplete, "cut at {n}");
        }
    }

    #[test]
    fn http_requests_without_one_clear_host_are_refused() {
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), Peek::NoName);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Peek::Invalid
        );
        // Absolute form and CONNECT name their own destination.
        assert_eq!(
            http_host(b"GET http://other.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
            Peek::Invalid
        );
        assert_eq!(
            http_host(b"CONNECT other.test:443 HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
            Peek::Invalid
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Peek::Invalid
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a.test:x\r\n\r\n"),
            Peek::Invalid
        );
        assert_eq!(http_host(b"\x16\x03\x01\x00\x05hello"), Peek::Invalid);
        assert_eq!(
            http_host(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Peek::Invalid
        );
        // More headers than the parser holds.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"Host: allowed.test\r\n\r\n");
        assert_eq!(http_host(&many), Peek::Invalid);
    }
}
