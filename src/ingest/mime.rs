//! Raw mail to the fields of a PNS "new mail" (type 70) message.
//!
//! The Maildir watcher hands [`summarize`] the bytes of a delivered file and
//! gets back the decoded `From`, `Subject`, `Message-ID`, `Date` and a short
//! text snippet. The Dovecot endpoint uses [`decode_header_value`] (or
//! [`display_address`]) for the `from`/`subject` it receives still
//! RFC 2047-encoded, and [`decode_modified_utf7`] for IMAP folder names.
//!
//! Everything here is lenient: a broken message (bad charset, truncated
//! base64, missing boundary, unterminated markup) degrades to what can be
//! read; nothing panics. Charsets are decoded with `encoding_rs` (WHATWG
//! labels plus the usual mail aliases, and UTF-7 by hand); an unknown charset
//! is read as UTF-8 when the bytes are (nearly all) valid UTF-8, else as
//! windows-1252.

use encoding_rs::Encoding;
use std::borrow::Cow;

/// Length of the snippet [`summarize`] makes, in characters (as Dovecot does).
pub const SNIPPET_CHARS: usize = 200;

/// Deepest nesting of multiparts / attached messages that is followed.
const MAX_DEPTH: usize = 16;
/// Most body parts of one multipart that are looked at.
const MAX_PARTS: usize = 256;
/// Most parameters of one header field that are read.
const MAX_PARAMS: usize = 64;
/// Most bytes of one (still transfer-encoded) text part that are decoded.
const MAX_TEXT_BYTES: usize = 1 << 20;

/// The fields of a "new mail" message, decoded to UTF-8.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailSummary {
    /// First mailbox of `From`: `Name <addr>` with the name decoded, or `addr`.
    pub from: Option<String>,
    /// Decoded `Subject` (present but possibly empty when the header is).
    pub subject: Option<String>,
    /// `Message-ID` without the angle brackets.
    pub message_id: Option<String>,
    /// `Date` as RFC 3339 (`2003-07-01T10:52:37+02:00`), or the raw header
    /// (whitespace collapsed) when it cannot be parsed.
    pub date: Option<String>,
    /// At most [`SNIPPET_CHARS`] characters of body text, whitespace collapsed.
    pub snippet: String,
}

/// Why bytes could not be read as a mail message at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MimeError {
    #[error("not a mail message: no header fields")]
    NoHeaders,
    #[error("not a mail message: no blank line between header and body")]
    NoSeparator,
}

/// Parse a whole RFC 5322 message (bytes as read from a Maildir file).
///
/// A message with no header/body separator, or no header field at all, is an
/// error; everything else degrades gracefully (missing fields are `None`, an
/// unreadable body gives an empty snippet).
pub fn summarize(raw: &[u8]) -> Result<MailSummary, MimeError> {
    let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(MimeError::NoHeaders);
    }
    let (head, body) = split_head_body(raw).ok_or(MimeError::NoSeparator)?;
    let headers = Headers::parse(head);
    if headers.fields.is_empty() {
        return Err(MimeError::NoHeaders);
    }

    // Raw 8-bit header bytes that are not UTF-8 are most likely in the
    // message's own charset.
    let ct = headers.content_type("text/plain");
    let header_charset = ct.param("charset").map_or(Charset::Unknown, lookup_charset);
    let text = |name: &str| headers.get(name).map(|v| header_text(v, header_charset));

    let from = text("from").and_then(|v| display_address(&v));
    let subject = text("subject").map(|v| decode_header_value(&v));
    let message_id = text("message-id").and_then(|v| parse_message_id(&v));
    let date = text("date").and_then(|v| {
        let v = normalize_line(&v);
        if v.is_empty() {
            None
        } else {
            Some(parse_date(&v).unwrap_or(v))
        }
    });
    let found = find_text(&headers, body, 0, "text/plain", true)
        .or_else(|| find_text(&headers, body, 0, "text/plain", false));
    let snippet = found.map(|f| f.snippet()).unwrap_or_default();
    Ok(MailSummary {
        from,
        subject,
        message_id,
        date,
        snippet,
    })
}

/// Decode RFC 2047 encoded-words in a header value (Dovecot sends
/// `from`/`subject` still encoded).
///
/// Any charset `encoding_rs` knows (plus UTF-7), B and Q encoding, encoded
/// words also inside quotes or glued to text; adjacent encoded words are
/// joined without the whitespace between them (and their bytes decoded
/// together, so a character split across two words survives). Unknown
/// charsets are read as UTF-8 or windows-1252. Line breaks, control
/// characters and runs of whitespace become one space; the result is trimmed.
pub fn decode_header_value(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut pending: Option<(String, Vec<u8>)> = None;
    let mut text_start = 0;
    let mut after_word = false;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'=' && b[i + 1] == b'?' {
            if let Some(word) = parse_encoded_word(raw, i) {
                let between = &raw[text_start..i];
                if !(after_word && between.chars().all(char::is_whitespace)) {
                    flush_word(&mut pending, &mut out);
                    out.push_str(between);
                }
                match &mut pending {
                    Some((charset, bytes))
                        if charset.eq_ignore_ascii_case(&word.charset)
                            && !is_stateful(&word.charset) =>
                    {
                        bytes.extend_from_slice(&word.bytes)
                    }
                    _ => {
                        flush_word(&mut pending, &mut out);
                        pending = Some((word.charset, word.bytes));
                    }
                }
                i = word.end;
                text_start = i;
                after_word = true;
                continue;
            }
        }
        i += 1;
    }
    flush_word(&mut pending, &mut out);
    out.push_str(&raw[text_start..]);
    normalize_line(&out)
}

/// The display form of the first mailbox of an address header (`From`):
/// `Name <addr>` with the name RFC 2047-decoded and unquoted, or just `addr`
/// (also when the name is the address). Old-style `addr (Name)` gives
/// `Name <addr>`. `None` when the value is empty.
pub fn display_address(raw: &str) -> Option<String> {
    let mut mb = first_mailbox(raw);
    if mb.unterminated {
        mb = first_mailbox(&raw.replace('"', ""));
    }
    let (name, addr) = match mb.angle {
        Some(angle) => {
            let name = decode_header_value(&mb.phrase);
            let name = if name.is_empty() {
                decode_header_value(&mb.comment)
            } else {
                name
            };
            (name, clean_addr(&angle))
        }
        None => {
            let spec = clean_addr(&mb.phrase);
            if spec.contains('@') {
                (decode_header_value(&mb.comment), spec)
            } else {
                (decode_header_value(&mb.phrase), String::new())
            }
        }
    };
    let name = name.trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace());
    let shown = match (name.is_empty(), addr.is_empty()) {
        (false, false) if !name.eq_ignore_ascii_case(&addr) => format!("{name} <{addr}>"),
        (_, false) => addr,
        (false, true) => name.to_owned(),
        (true, true) => {
            let group = decode_header_value(&mb.group);
            if group.is_empty() {
                decode_header_value(raw)
            } else {
                group
            }
        }
    };
    (!shown.is_empty()).then_some(shown)
}

/// Make a snippet: whitespace collapsed to single spaces, trimmed, invisible
/// filler characters (zero-width spaces, soft hyphens… used as e-mail
/// "preheader" padding) and control characters dropped, and at most
/// `max_chars` characters, the last being '…' when the text was cut.
pub fn make_snippet(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut count = 0usize;
    let mut space = false;
    let mut cut = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if c.is_control() || is_invisible(c) {
            continue;
        }
        // A zero-width non-joiner matters only between two letters (Persian…);
        // elsewhere it is preheader padding.
        if c == '\u{200C}'
            && !(!space
                && out.chars().next_back().is_some_and(char::is_alphabetic)
                && chars.peek().is_some_and(|n| n.is_alphabetic()))
        {
            continue;
        }
        let need = if space { 2 } else { 1 };
        if count + need > max_chars {
            cut = true;
            break;
        }
        if space {
            out.push(' ');
            count += 1;
            space = false;
        }
        out.push(c);
        count += 1;
    }
    if cut {
        if max_chars == 0 {
            return String::new();
        }
        while count > max_chars - 1 {
            out.pop();
            count -= 1;
        }
        while out.ends_with(|c: char| c.is_whitespace() || c == '\u{200D}') {
            out.pop();
        }
        out.push('…');
    }
    out
}

/// Decode an IMAP modified UTF-7 mailbox name (RFC 3501 §5.1.3):
/// `"&ZeVnLIqe-"` → `"日本語"`, `"&AMk-t&AOk-"` → `"Été"`, `"&-"` → `"&"`.
/// Input that is not valid modified UTF-7 (already UTF-8, a lone `&`, bad
/// base64, unpaired surrogates…) is returned as it is.
pub fn decode_modified_utf7(name: &str) -> String {
    decode_mutf7_strict(name).unwrap_or_else(|| name.to_owned())
}

fn decode_mutf7_strict(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'&' {
            let end = i + 1 + b[i + 1..].iter().position(|&x| x == b'-')?;
            let encoded = &b[i + 1..end];
            if encoded.is_empty() {
                out.push('&');
            } else {
                let (units, clean) = utf16_from_base64(encoded, b',')?;
                if !clean {
                    return None;
                }
                out.push_str(&String::from_utf16(&units).ok()?);
            }
            i = end + 1;
        } else if (0x20..0x7f).contains(&c) {
            out.push(char::from(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Lines, header fields, parameters

/// Lines of a byte slice: (offset of the line, line without CRLF / LF).
struct Lines<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    fn new(data: &'a [u8]) -> Self {
        Lines { data, pos: 0 }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.pos;
        let rest = self.data.get(start..).filter(|r| !r.is_empty())?;
        let (line, advance) = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => (&rest[..n], n + 1),
            None => (rest, rest.len()),
        };
        self.pos = start + advance;
        Some((start, line.strip_suffix(b"\r").unwrap_or(line)))
    }
}

/// Split at the first empty line: (header block, body).
fn split_head_body(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut lines = Lines::new(data);
    while let Some((start, line)) = lines.next() {
        if line.is_empty() {
            return Some((&data[..start], &data[lines.pos..]));
        }
    }
    None
}

/// Header fields in order, names lower-cased, values unfolded (raw bytes).
#[derive(Default)]
struct Headers {
    fields: Vec<(String, Vec<u8>)>,
    /// Whether a continuation line may still extend the last field.
    open: bool,
}

impl Headers {
    /// Every field of a header block; lines that are no field are skipped.
    fn parse(block: &[u8]) -> Headers {
        let mut headers = Headers::default();
        for (_, line) in Lines::new(block) {
            if !headers.push_line(line) {
                headers.open = false;
            }
        }
        headers
    }

    /// Take one header line; false when it is neither a field nor a
    /// continuation of one.
    fn push_line(&mut self, line: &[u8]) -> bool {
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if let Some(last) = self.fields.last_mut().filter(|_| self.open) {
                last.1.extend_from_slice(line);
                return true;
            }
            return false;
        }
        match field_name(line) {
            Some((name, value_at)) => {
                self.fields.push((name, line[value_at..].to_vec()));
                self.open = true;
                true
            }
            None => false,
        }
    }

    /// First field of that (lower-case) name, trimmed.
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim_ascii())
    }

    fn get_str(&self, name: &str) -> Option<Cow<'_, str>> {
        self.get(name).map(String::from_utf8_lossy)
    }

    fn content_type(&self, default: &str) -> ContentType {
        let (mime, params) = match self.get_str("content-type") {
            Some(v) => parse_params(&v),
            None => (String::new(), Vec::new()),
        };
        let mime = mime
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
            .unwrap_or("");
        let mime = if mime.contains('/') {
            mime.to_owned()
        } else {
            default.to_owned()
        };
        ContentType { mime, params }
    }

    fn transfer_encoding(&self) -> String {
        self.get_str("content-transfer-encoding")
            .map(|v| v.trim().trim_matches('"').to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// An attachment: `Content-Disposition: attachment`, or (when `named`)
    /// any part that carries a file name.
    fn is_attachment(&self, ct: &ContentType, named: bool) -> bool {
        let disposition = self
            .get_str("content-disposition")
            .map(|v| parse_params(&v));
        if let Some((kind, params)) = &disposition {
            if kind == "attachment" {
                return true;
            }
            if named && param(params, "filename").is_some() {
                return true;
            }
        }
        named && ct.param("name").is_some()
    }
}

/// `Name:` at the start of a header line: (lower-case name, offset of value).
fn field_name(line: &[u8]) -> Option<(String, usize)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = line[..colon].trim_ascii_end();
    if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
        return None;
    }
    Some((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        colon + 1,
    ))
}

/// A header value as text: UTF-8 when it is, else the given charset.
fn header_text(value: &[u8], charset: Charset) -> String {
    match std::str::from_utf8(value) {
        Ok(s) => s.to_owned(),
        Err(_) => decode_bytes(charset, value),
    }
}

struct ContentType {
    /// Lower-case `type/subtype`.
    mime: String,
    params: Vec<(String, String)>,
}

impl ContentType {
    fn param(&self, name: &str) -> Option<&str> {
        param(&self.params, name)
    }
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `value; a=b; c="d"` → (lower-case value, parameters with lower-case
/// names). Quoted strings, RFC 2231 extended values and continuations.
fn parse_params(value: &str) -> (String, Vec<(String, String)>) {
    let (main, rest) = value.split_once(';').unwrap_or((value, ""));
    let b = rest.as_bytes();
    let mut raw: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b';' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let name_start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b';' {
            i += 1;
        }
        let name = rest[name_start..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] == b';' {
            continue;
        }
        i += 1; // '='
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value = if b.get(i) == Some(&b'"') {
            i += 1;
            let mut v = Vec::new();
            while i < b.len() {
                match b[i] {
                    b'\\' if i + 1 < b.len() => {
                        v.push(b[i + 1]);
                        i += 2;
                    }
                    b'"' => {
                        i += 1;
                        break;
                    }
                    c => {
                        v.push(c);
                        i += 1;
                    }
                }
            }
            while i < b.len() && b[i] != b';' {
                i += 1;
            }
            String::from_utf8_lossy(&v).into_owned()
        } else {
            let start = i;
            while i < b.len() && b[i] != b';' {
                i += 1;
            }
            rest[start..i].trim().to_owned()
        };
        if !name.is_empty() {
            raw.push((name, value));
            if raw.len() >= MAX_PARAMS {
                break;
            }
        }
    }
    (main.trim().to_ascii_lowercase(), merge_rfc2231(raw))
}

/// Join RFC 2231 sections (`name*0*=utf-8''a%20b; name*1=c`) into one value.
fn merge_rfc2231(raw: Vec<(String, String)>) -> Vec<(String, String)> {
    if !raw.iter().any(|(n, _)| n.contains('*')) {
        return raw;
    }
    type Sections = Vec<(u32, bool, String)>;
    let mut merged: Vec<(String, Option<String>, Sections)> = Vec::new();
    for (name, value) in raw {
        let (base, section, extended) = match name.split_once('*') {
            None => (name.clone(), None, false),
            Some((base, rest)) => {
                let extended = rest.ends_with('*') || rest.is_empty();
                let number = rest.trim_end_matches('*');
                (
                    base.to_owned(),
                    Some(number.parse::<u32>().unwrap_or(0)),
                    extended,
                )
            }
        };
        let entry = match merged.iter().position(|(n, _, _)| *n == base) {
            Some(p) => &mut merged[p],
            None => {
                merged.push((base, None, Vec::new()));
                let last = merged.len() - 1;
                &mut merged[last]
            }
        };
        match section {
            None => {
                entry.1.get_or_insert(value);
            }
            Some(n) => entry.2.push((n, extended, value)),
        }
    }
    merged
        .into_iter()
        .map(|(name, plain, mut sections)| {
            if sections.is_empty() {
                return (name, plain.unwrap_or_default());
            }
            sections.sort_by_key(|s| s.0);
            let mut charset = String::new();
            let mut bytes = Vec::new();
            for (idx, (_, extended, value)) in sections.iter().enumerate() {
                if !*extended {
                    bytes.extend_from_slice(value.as_bytes());
                    continue;
                }
                let mut v = value.as_str();
                if idx == 0 {
                    let mut pieces = v.splitn(3, '\'');
                    if let (Some(cs), Some(_lang), Some(text)) =
                        (pieces.next(), pieces.next(), pieces.next())
                    {
                        charset = cs.to_owned();
                        v = text;
                    }
                }
                bytes.extend(percent_decode(v.as_bytes()));
            }
            let cs = if charset.is_empty() {
                "utf-8"
            } else {
                charset.as_str()
            };
            (name, decode_charset(cs, &bytes))
        })
        .collect()
}

fn percent_decode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(data.get(i + 1)), hex(data.get(i + 2))) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

fn hex(c: Option<&u8>) -> Option<u8> {
    c.and_then(|&c| char::from(c).to_digit(16))
        .and_then(|d| u8::try_from(d).ok())
}

// ---------------------------------------------------------------------------
// Body: MIME structure, transfer encodings, charsets, HTML

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Html,
}

struct Found {
    kind: Kind,
    text: String,
}

impl Found {
    fn snippet(&self) -> String {
        match self.kind {
            Kind::Plain => make_snippet(&strip_quoted(&self.text), SNIPPET_CHARS),
            Kind::Html => make_snippet(&self.text, SNIPPET_CHARS),
        }
    }
}

/// The body text of a part: in a multipart/alternative the text/plain
/// alternative, else the text/html one; in any other multipart the first
/// part that has text. Attachments are skipped (and, when `named`, so is
/// every part with a file name).
fn find_text(
    headers: &Headers,
    body: &[u8],
    depth: usize,
    default_mime: &str,
    named: bool,
) -> Option<Found> {
    let ct = headers.content_type(default_mime);
    if depth > 0 && headers.is_attachment(&ct, named) {
        return None;
    }
    if let Some(subtype) = ct.mime.strip_prefix("multipart/") {
        if depth >= MAX_DEPTH {
            return None;
        }
        let parts = split_multipart(body, ct.param("boundary"));
        if parts.is_empty() {
            // No delimiter anywhere: what is there is all there is.
            return text_part(Kind::Plain, headers, &ct, body);
        }
        let child_default = if subtype == "digest" {
            "message/rfc822"
        } else {
            "text/plain"
        };
        let mut fallback = None;
        for part in parts {
            let (h, b) = parse_part(part);
            if let Some(found) = find_text(&h, b, depth + 1, child_default, named) {
                if subtype != "alternative" || found.kind == Kind::Plain {
                    return Some(found);
                }
                fallback.get_or_insert(found);
            }
        }
        return fallback;
    }
    match ct.mime.as_str() {
        "text/plain" => text_part(Kind::Plain, headers, &ct, body),
        "text/html" | "application/xhtml+xml" => text_part(Kind::Html, headers, &ct, body),
        "message/rfc822" | "message/global" if depth < MAX_DEPTH => {
            let inner = decode_transfer(&headers.transfer_encoding(), body);
            let (h, b) = parse_part(&inner);
            find_text(&h, b, depth + 1, "text/plain", named)
        }
        _ => None,
    }
}

/// Decoded text of a text part; `None` when it has nothing visible.
fn text_part(kind: Kind, headers: &Headers, ct: &ContentType, body: &[u8]) -> Option<Found> {
    let body = &body[..body.len().min(MAX_TEXT_BYTES)];
    let bytes = decode_transfer(&headers.transfer_encoding(), body);
    let mut charset = ct.param("charset").map_or(Charset::Unknown, lookup_charset);
    if kind == Kind::Html && ct.param("charset").is_none() {
        if let Some(meta) = sniff_meta_charset(&bytes) {
            charset = match lookup_charset(&meta) {
                // HTML: a <meta> that claims UTF-16 in an ASCII-compatible
                // document means UTF-8.
                Charset::Known(e) if e == encoding_rs::UTF_16LE || e == encoding_rs::UTF_16BE => {
                    Charset::Known(encoding_rs::UTF_8)
                }
                other => other,
            };
        }
    }
    let text = decode_bytes(charset, &bytes);
    let text = match kind {
        Kind::Plain => text,
        Kind::Html => html_to_text(&text),
    };
    if make_snippet(&text, 1).is_empty() {
        return None;
    }
    Some(Found { kind, text })
}

/// Header fields and body of a body part, leniently: the header ends at
/// the first empty line or the first line that is no header field.
fn parse_part(data: &[u8]) -> (Headers, &[u8]) {
    let mut headers = Headers::default();
    let mut lines = Lines::new(data);
    while let Some((start, line)) = lines.next() {
        if line.is_empty() {
            return (headers, &data[lines.pos..]);
        }
        if !headers.push_line(line) {
            return (headers, &data[start..]);
        }
    }
    (headers, &data[data.len()..])
}

/// The body parts of a multipart body. With no usable boundary parameter
/// the first line that looks like a delimiter is taken as one. Empty when
/// no delimiter is found.
fn split_multipart<'a>(body: &'a [u8], boundary: Option<&str>) -> Vec<&'a [u8]> {
    if let Some(boundary) = boundary.map(str::trim_end).filter(|b| !b.is_empty()) {
        let parts = split_on(body, boundary.as_bytes());
        if !parts.is_empty() {
            return parts;
        }
    }
    let guessed = Lines::new(body).find_map(|(_, line)| {
        let b = line.strip_prefix(b"--")?;
        let b = b.strip_suffix(b"--").unwrap_or(b);
        (b.iter().any(u8::is_ascii_alphanumeric) && !b.iter().any(u8::is_ascii_whitespace))
            .then_some(b)
    });
    guessed.map(|b| split_on(body, b)).unwrap_or_default()
}

fn split_on<'a>(body: &'a [u8], boundary: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut current: Option<usize> = None;
    let mut lines = Lines::new(body);
    while let Some((start, line)) = lines.next() {
        let Some(rest) = line
            .strip_prefix(b"--")
            .and_then(|l| l.strip_prefix(boundary))
        else {
            continue;
        };
        let closing = rest.starts_with(b"--");
        if !closing && !rest.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(s) = current.take() {
            // The line break before a delimiter belongs to the delimiter.
            let mut end = start;
            if end > s && body[end - 1] == b'\n' {
                end -= 1;
                if end > s && body[end - 1] == b'\r' {
                    end -= 1;
                }
            }
            parts.push(&body[s..end]);
            if parts.len() >= MAX_PARTS {
                return parts;
            }
        }
        if closing {
            return parts;
        }
        current = Some(lines.pos);
    }
    if let Some(s) = current {
        parts.push(&body[s.min(body.len())..]);
    }
    parts
}

fn decode_transfer<'a>(encoding: &str, data: &'a [u8]) -> Cow<'a, [u8]> {
    match encoding {
        "base64" => Cow::Owned(decode_base64(data)),
        "quoted-printable" => Cow::Owned(decode_quoted_printable(data)),
        _ => Cow::Borrowed(data),
    }
}

/// Lenient base64: other characters are skipped, `=` ends a group (so
/// separately padded chunks still decode), a truncated tail is dropped.
fn decode_base64(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                acc = 0;
                bits = 0;
                continue;
            }
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn decode_quoted_printable(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        let c = data[i];
        if c == b'=' {
            if let (Some(h), Some(l)) = (hex(data.get(i + 1)), hex(data.get(i + 2))) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            // Soft line break, possibly with trailing blanks before it.
            let mut j = i + 1;
            while j < data.len() && (data[j] == b' ' || data[j] == b'\t') {
                j += 1;
            }
            match data.get(j) {
                None => {
                    i = j;
                    continue;
                }
                Some(b'\n') => {
                    i = j + 1;
                    continue;
                }
                Some(b'\r') => {
                    i = if data.get(j + 1) == Some(&b'\n') {
                        j + 2
                    } else {
                        j + 1
                    };
                    continue;
                }
                Some(_) => {}
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// RFC 2047 Q encoding.
fn decode_q(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'_' => out.push(b' '),
            b'=' => {
                if let (Some(h), Some(l)) = (hex(data.get(i + 1)), hex(data.get(i + 2))) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                out.push(b'=');
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// Base64 (with `c63` as the 64th digit) read as UTF-16BE code units, for
/// UTF-7 and modified UTF-7. `None` on a non-alphabet byte; the flag says
/// whether the bits ended cleanly.
fn utf16_from_base64(data: &[u8], c63: u8) -> Option<(Vec<u16>, bool)> {
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut bytes = Vec::with_capacity(data.len());
    for &c in data {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ if c == c63 => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            bytes.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    let clean = acc == 0 && bytes.len() % 2 == 0;
    let units = bytes
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    Some((units, clean))
}

/// UTF-7 (RFC 2152), leniently.
fn decode_utf7(data: &[u8]) -> String {
    let is_b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    let mut out = String::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        let c = data[i];
        if c == b'+' {
            let start = i + 1;
            let end = start + data[start..].iter().take_while(|c| is_b64(c)).count();
            if end > start {
                if let Some((units, _)) = utf16_from_base64(&data[start..end], b'/') {
                    out.push_str(&String::from_utf16_lossy(&units));
                }
            } else {
                out.push('+');
            }
            i = if data.get(end) == Some(&b'-') {
                end + 1
            } else {
                end
            };
        } else {
            out.push(if c.is_ascii() {
                char::from(c)
            } else {
                '\u{FFFD}'
            });
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charset {
    Known(&'static Encoding),
    Utf7,
    /// Missing, US-ASCII or unknown: UTF-8 when it mostly is, else windows-1252.
    Unknown,
}

fn lookup_charset(label: &str) -> Charset {
    let label = label
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .trim()
        .to_ascii_lowercase();
    // RFC 2231 language suffix: `utf-8*en`.
    let label = label.split('*').next().unwrap_or("");
    let alias = match label {
        "" | "us-ascii" | "ascii" | "ansi_x3.4-1968" | "iso646-us" | "us" | "unknown"
        | "unknown-8bit" | "x-unknown" | "default" | "7bit" | "8bit" => return Charset::Unknown,
        "utf-7" | "utf7" | "unicode-1-1-utf-7" | "csunicode11utf7" | "x-utf-7" => {
            return Charset::Utf7
        }
        "cp936" | "ms936" | "windows-936" | "euc-cn" | "euc_cn" | "x-euc-cn" | "eucgb2312_cn"
        | "euc-gb2312-cn" | "gb-2312" | "gb2312-80" => "gbk",
        "cp932" | "windows-932" | "x-ms-cp932" | "shift-jisx0213" | "shift_jisx0213" => "shift_jis",
        "iso-2022-jp-1" | "iso-2022-jp-2" | "iso-2022-jp-3" | "iso-2022-jp-ext"
        | "csiso2022jp2" => "iso-2022-jp",
        "big5hkscs" | "big5_hkscs" | "big5-tw" | "big5_tw" | "cp950" | "ms950" | "windows-950"
        | "x-big5" | "big-5" | "big-five" => "big5",
        "cp949" | "ms949" | "uhc" | "ks_c_5601" | "ks_c_5601-1989" | "windows-949"
        | "x-windows-949" => "euc-kr",
        "latin-1" => "iso-8859-1",
        "latin9" | "latin-9" => "iso-8859-15",
        "tis620" => "tis-620",
        "utf8mb4" | "utf-8-sig" | "x-utf-8" | "x-utf8" => "utf-8",
        other => other,
    };
    let encoding = Encoding::for_label(alias.as_bytes())
        .or_else(|| Encoding::for_label(alias.replace('_', "-").as_bytes()))
        .or_else(|| {
            alias
                .strip_prefix("x-")
                .and_then(|a| Encoding::for_label(a.as_bytes()))
        });
    match encoding {
        // hz-gb-2312, iso-2022-kr/cn: the WHATWG "replacement" decoder only
        // yields U+FFFD, reading the bytes as they are is more useful.
        Some(e) if e == encoding_rs::REPLACEMENT => Charset::Unknown,
        Some(e) => Charset::Known(e),
        None => Charset::Unknown,
    }
}

fn decode_bytes(charset: Charset, bytes: &[u8]) -> String {
    match charset {
        Charset::Known(encoding) => encoding.decode(bytes).0.into_owned(),
        Charset::Utf7 => decode_utf7(bytes),
        Charset::Unknown if mostly_utf8(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Charset::Unknown => encoding_rs::WINDOWS_1252
            .decode_without_bom_handling(bytes)
            .0
            .into_owned(),
    }
}

/// UTF-8 apart from a few bad sequences (a cut character, a stray byte),
/// rather than a legacy 8-bit charset.
fn mostly_utf8(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => return true,
        // Valid UTF-8 with non-ASCII in it up to a character cut at the end
        // (a lone trailing byte alone is as likely Latin-1).
        Err(e) if e.error_len().is_none() && !bytes[..e.valid_up_to()].is_ascii() => return true,
        Err(_) => {}
    }
    let (mut multibyte, mut invalid) = (0usize, 0usize);
    for chunk in bytes.utf8_chunks() {
        multibyte += chunk.valid().chars().filter(|c| !c.is_ascii()).count();
        invalid += usize::from(!chunk.invalid().is_empty());
    }
    invalid * 2 <= multibyte
}

fn decode_charset(label: &str, bytes: &[u8]) -> String {
    decode_bytes(lookup_charset(label), bytes)
}

/// `<meta charset=…>` or `<meta http-equiv… content="…; charset=…">` near
/// the start of an HTML document.
fn sniff_meta_charset(html: &[u8]) -> Option<String> {
    let head = html[..html.len().min(4096)].to_ascii_lowercase();
    let mut from = 0;
    while let Some(p) = find(&head, from, b"<meta") {
        let end = head[p..]
            .iter()
            .position(|&c| c == b'>')
            .map_or(head.len(), |e| p + e);
        let tag = &head[p..end];
        if let Some(c) = find(tag, 0, b"charset") {
            let rest = &tag[c + 7..];
            let rest = rest.trim_ascii_start();
            if let Some(rest) = rest.strip_prefix(b"=") {
                let rest = rest.trim_ascii_start();
                let rest = rest
                    .strip_prefix(b"\"")
                    .or_else(|| rest.strip_prefix(b"'"))
                    .unwrap_or(rest);
                let len = rest
                    .iter()
                    .take_while(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':')
                    })
                    .count();
                if len > 0 {
                    return Some(String::from_utf8_lossy(&rest[..len]).into_owned());
                }
            }
        }
        from = end;
    }
    None
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn find_ignore_case(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| p + from)
}

/// Elements whose content is no text to show.
const SKIPPED_ELEMENTS: &[&str] = &["script", "style", "head", "title", "template", "svg", "xml"];

/// Elements that separate words.
const BLOCK_ELEMENTS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "body",
    "br",
    "caption",
    "center",
    "dd",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "html",
    "li",
    "main",
    "nav",
    "ol",
    "option",
    "p",
    "pre",
    "section",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "tr",
    "ul",
];

/// Text of an HTML document: tags, comments, scripts, styles and the head
/// removed, block elements separating words, character references decoded.
fn html_to_text(html: &str) -> String {
    let b = html.as_bytes();
    let mut out = String::with_capacity(html.len() / 2);
    let mut i = 0;
    let mut text_start = 0;
    // Elements whose end tag was searched for and is not there (searching
    // again for each start tag would be quadratic).
    let mut unclosed: Vec<String> = Vec::new();
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let next = b.get(i + 1).copied().unwrap_or(0);
        if !(next.is_ascii_alphabetic() || matches!(next, b'/' | b'!' | b'?')) {
            i += 1; // a literal '<'
            continue;
        }
        decode_entities(&html[text_start..i], &mut out);
        i = if b[i..].starts_with(b"<!--") {
            find(b, i + 4, b"-->").map_or(b.len(), |p| p + 3)
        } else if next == b'!' || next == b'?' {
            tag_end(b, i + 2)
        } else {
            let closing = next == b'/';
            let name_start = i + 1 + usize::from(closing);
            let name_len = b[name_start..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b':'))
                .count();
            let name = html[name_start..name_start + name_len].to_ascii_lowercase();
            let end = tag_end(b, name_start + name_len);
            if BLOCK_ELEMENTS.contains(&name.as_str()) {
                out.push(' ');
            }
            let self_closing = end >= 2 && b[end - 2] == b'/';
            if !closing
                && !self_closing
                && SKIPPED_ELEMENTS.contains(&name.as_str())
                && !unclosed.contains(&name)
            {
                let close = format!("</{name}");
                match find_ignore_case(b, end, close.as_bytes()) {
                    Some(p) => tag_end(b, p + close.len()),
                    // Unclosed script or style: the rest is not text.
                    None if name == "script" || name == "style" => b.len(),
                    None => {
                        unclosed.push(name);
                        end
                    }
                }
            } else {
                end
            }
        };
        text_start = i;
    }
    decode_entities(&html[text_start.min(b.len())..], &mut out);
    out
}

/// Index just past the '>' that ends the tag (quotes in attribute values
/// honoured), or the end of the input.
fn tag_end(b: &[u8], from: usize) -> usize {
    let mut quote: Option<u8> = None;
    let mut prev = 0u8;
    let mut i = from;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'>' => return i + 1,
            None if (c == b'"' || c == b'\'') && prev == b'=' => quote = Some(c),
            None => {}
        }
        if !c.is_ascii_whitespace() {
            prev = c;
        }
        i += 1;
    }
    b.len()
}

fn decode_entities(s: &str, out: &mut String) {
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        match parse_entity(after) {
            Some((c, used)) => {
                out.push(c);
                rest = &after[used..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
}

/// A character reference after its '&': (character, bytes used).
fn parse_entity(s: &str) -> Option<(char, usize)> {
    let b = s.as_bytes();
    if b.first() == Some(&b'#') {
        let (radix, start) = if matches!(b.get(1), Some(b'x' | b'X')) {
            (16, 2)
        } else {
            (10, 1)
        };
        let digits = b[start..]
            .iter()
            .take_while(|c| char::from(**c).is_digit(radix))
            .count();
        if digits == 0 {
            return None;
        }
        let mut end = start + digits;
        let code = u32::from_str_radix(&s[start..end], radix).unwrap_or(u32::MAX);
        if b.get(end) == Some(&b';') {
            end += 1;
        }
        return Some((numeric_reference(code), end));
    }
    let len = b
        .iter()
        .take(32)
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    let name = &s[..len];
    let c = named_entity(name)?;
    if b.get(len) == Some(&b';') {
        Some((c, len + 1))
    } else if matches!(name, "amp" | "lt" | "gt" | "quot" | "nbsp") {
        Some((c, len))
    } else {
        None
    }
}

fn numeric_reference(code: u32) -> char {
    match code {
        0 => '\u{FFFD}',
        // As browsers do: C1 controls mean windows-1252.
        0x80..=0x9F => {
            let byte = [code as u8];
            encoding_rs::WINDOWS_1252
                .decode_without_bom_handling(&byte)
                .0
                .chars()
                .next()
                .unwrap_or('\u{FFFD}')
        }
        _ => char::from_u32(code).unwrap_or('\u{FFFD}'),
    }
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" | "AMP" => '&',
        "lt" | "LT" => '<',
        "gt" | "GT" => '>',
        "quot" | "QUOT" => '"',
        "apos" => '\'',
        "nbsp" => '\u{A0}',
        "ensp" => '\u{2002}',
        "emsp" => '\u{2003}',
        "thinsp" => '\u{2009}',
        "zwnj" => '\u{200C}',
        "zwj" => '\u{200D}',
        "lrm" => '\u{200E}',
        "rlm" => '\u{200F}',
        "shy" => '\u{AD}',
        "copy" | "COPY" => '©',
        "reg" | "REG" => '®',
        "trade" => '™',
        "hellip" => '…',
        "mdash" => '—',
        "ndash" => '–',
        "lsquo" => '‘',
        "rsquo" => '’',
        "sbquo" => '‚',
        "ldquo" => '“',
        "rdquo" => '”',
        "bdquo" => '„',
        "laquo" => '«',
        "raquo" => '»',
        "lsaquo" => '‹',
        "rsaquo" => '›',
        "bull" => '•',
        "middot" => '·',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "cent" => '¢',
        "sect" => '§',
        "para" => '¶',
        "deg" => '°',
        "plusmn" => '±',
        "times" => '×',
        "divide" => '÷',
        "iexcl" => '¡',
        "iquest" => '¿',
        "frac12" => '½',
        "frac14" => '¼',
        "frac34" => '¾',
        "sup2" => '²',
        "sup3" => '³',
        "micro" => 'µ',
        "larr" => '←',
        "rarr" => '→',
        "uarr" => '↑',
        "darr" => '↓',
        "hearts" => '♥',
        "check" => '✓',
        "Agrave" => 'À',
        "Aacute" => 'Á',
        "Acirc" => 'Â',
        "Atilde" => 'Ã',
        "Auml" => 'Ä',
        "Aring" => 'Å',
        "AElig" => 'Æ',
        "Ccedil" => 'Ç',
        "Egrave" => 'È',
        "Eacute" => 'É',
        "Ecirc" => 'Ê',
        "Euml" => 'Ë',
        "Igrave" => 'Ì',
        "Iacute" => 'Í',
        "Icirc" => 'Î',
        "Iuml" => 'Ï',
        "Ntilde" => 'Ñ',
        "Ograve" => 'Ò',
        "Oacute" => 'Ó',
        "Ocirc" => 'Ô',
        "Otilde" => 'Õ',
        "Ouml" => 'Ö',
        "Oslash" => 'Ø',
        "Ugrave" => 'Ù',
        "Uacute" => 'Ú',
        "Ucirc" => 'Û',
        "Uuml" => 'Ü',
        "Yacute" => 'Ý',
        "szlig" => 'ß',
        "agrave" => 'à',
        "aacute" => 'á',
        "acirc" => 'â',
        "atilde" => 'ã',
        "auml" => 'ä',
        "aring" => 'å',
        "aelig" => 'æ',
        "ccedil" => 'ç',
        "egrave" => 'è',
        "eacute" => 'é',
        "ecirc" => 'ê',
        "euml" => 'ë',
        "igrave" => 'ì',
        "iacute" => 'í',
        "icirc" => 'î',
        "iuml" => 'ï',
        "ntilde" => 'ñ',
        "ograve" => 'ò',
        "oacute" => 'ó',
        "ocirc" => 'ô',
        "otilde" => 'õ',
        "ouml" => 'ö',
        "oslash" => 'ø',
        "ugrave" => 'ù',
        "uacute" => 'ú',
        "ucirc" => 'û',
        "uuml" => 'ü',
        "yacute" => 'ý',
        "yuml" => 'ÿ',
        "OElig" => 'Œ',
        "oelig" => 'œ',
        _ => return None,
    })
}

/// Plain text without quoted lines (`> …`), the attribution line right
/// before them (`On …, X wrote:`) and the signature (after a `-- ` line),
/// unless nothing else is left.
fn strip_quoted(text: &str) -> Cow<'_, str> {
    let quoted = |l: &str| l.starts_with('>');
    let signature = |l: &str| l.strip_suffix('\r').unwrap_or(l) == "-- ";
    if !text.lines().any(|l| quoted(l) || signature(l)) {
        return Cow::Borrowed(text);
    }
    let lines: Vec<&str> = text.lines().take_while(|l| !signature(l)).collect();
    let mut kept = String::with_capacity(text.len());
    for (i, line) in lines.iter().enumerate() {
        if quoted(line) {
            continue;
        }
        let attribution = line.trim_end().ends_with([':', '：'])
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| quoted(l));
        if !attribution {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if make_snippet(&kept, 1).is_empty() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(kept)
    }
}

/// Format characters that render as nothing and are used as padding.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{34F}'
            | '\u{61C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180E}'
            | '\u{200B}'
            | '\u{2060}'..='\u{2064}' | '\u{3164}' | '\u{FEFF}' | '\u{FFA0}'
    )
}

// ---------------------------------------------------------------------------
// Header field values

struct EncodedWord {
    charset: String,
    bytes: Vec<u8>,
    /// Index just past the closing `?=`.
    end: usize,
}

/// `=?charset?B|Q?text?=` starting at `start` (which holds `=?`).
fn parse_encoded_word(s: &str, start: usize) -> Option<EncodedWord> {
    let b = s.as_bytes();
    let cs_start = start + 2;
    let cs_len = b
        .get(cs_start..)?
        .iter()
        .take(80)
        .position(|&c| c == b'?')?;
    let charset = &b[cs_start..cs_start + cs_len];
    if charset.is_empty() || !charset.iter().all(|c| c.is_ascii_graphic()) {
        return None;
    }
    let p = cs_start + cs_len + 1;
    let encoding = *b.get(p)?;
    if b.get(p + 1) != Some(&b'?') {
        return None;
    }
    let text_start = p + 2;
    let text_len = b.get(text_start..)?.iter().position(|&c| c == b'?')?;
    let text_end = text_start + text_len;
    if b.get(text_end + 1) != Some(&b'=') {
        return None;
    }
    let text = &b[text_start..text_end];
    let bytes = match encoding {
        b'B' | b'b' => decode_base64(text),
        b'Q' | b'q' => decode_q(text),
        _ => return None,
    };
    Some(EncodedWord {
        charset: String::from_utf8_lossy(charset).into_owned(),
        bytes,
        end: text_end + 2,
    })
}

/// A charset whose words must each be decoded alone: ISO-2022-JP and UTF-7
/// words each end in the initial state, and joined they would read as an
/// empty shift sequence.
fn is_stateful(label: &str) -> bool {
    match lookup_charset(label) {
        Charset::Utf7 => true,
        Charset::Known(e) => e == encoding_rs::ISO_2022_JP,
        Charset::Unknown => false,
    }
}

fn flush_word(pending: &mut Option<(String, Vec<u8>)>, out: &mut String) {
    if let Some((charset, bytes)) = pending.take() {
        out.push_str(&decode_charset(&charset, &bytes));
    }
}

/// One line: whitespace and control characters collapsed to one space, trimmed.
fn normalize_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() {
            space = !out.is_empty();
        } else {
            if space {
                out.push(' ');
                space = false;
            }
            out.push(c);
        }
    }
    out
}

#[derive(Default)]
struct Mailbox {
    /// Display name (quoted strings unquoted), or the addr-spec itself.
    phrase: String,
    /// The `<…>` part.
    angle: Option<String>,
    /// First comment, an old-style display name.
    comment: String,
    /// Name of a group the mailbox is in.
    group: String,
    /// A quoted string ran to the end of the value.
    unterminated: bool,
}

/// The first mailbox of an address list (RFC 5322 §3.4), leniently.
fn first_mailbox(raw: &str) -> Mailbox {
    let mut mb = Mailbox::default();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                mb.unterminated = true;
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => mb.phrase.extend(chars.next()),
                        '"' => {
                            mb.unterminated = false;
                            break;
                        }
                        _ => mb.phrase.push(q),
                    }
                }
            }
            '(' => {
                let mut depth = 1usize;
                let mut text = String::new();
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => text.extend(chars.next()),
                        '(' => {
                            depth += 1;
                            text.push(q);
                        }
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                            text.push(q);
                        }
                        _ => text.push(q),
                    }
                }
                if mb.comment.is_empty() {
                    mb.comment = text;
                }
                mb.phrase.push(' ');
            }
            '<' => {
                let angle: String = chars.by_ref().take_while(|&q| q != '>').collect();
                mb.angle = Some(angle);
            }
            ',' | ';' => {
                if mb.angle.is_some() || !mb.phrase.trim().is_empty() {
                    break;
                }
                mb.phrase.clear();
                mb.comment.clear();
            }
            ':' if mb.angle.is_none() => {
                mb.group = std::mem::take(&mut mb.phrase);
                mb.comment.clear();
            }
            _ => mb.phrase.push(c),
        }
    }
    mb
}

/// An address without whitespace and without an obsolete source route.
fn clean_addr(addr: &str) -> String {
    let addr: String = addr.chars().filter(|c| !c.is_whitespace()).collect();
    match addr.strip_prefix('@').and_then(|a| a.split_once(':')) {
        Some((_, rest)) => rest.to_owned(),
        None => addr,
    }
}

fn parse_message_id(value: &str) -> Option<String> {
    let value = value.trim();
    if let Some((_, rest)) = value.split_once('<') {
        if let Some((id, _)) = rest.split_once('>') {
            let id: String = id.chars().filter(|c| !c.is_whitespace()).collect();
            if !id.is_empty() {
                return Some(id);
            }
        }
    }
    let token = value
        .split_whitespace()
        .next()?
        .trim_matches(|c| c == '<' || c == '>');
    (!token.is_empty()).then(|| token.to_owned())
}

/// An RFC 5322 date (obsolete forms, comments and the asctime order
/// tolerated) as RFC 3339, keeping the original offset.
fn parse_date(s: &str) -> Option<String> {
    let mut cleaned = String::with_capacity(s.len());
    let mut depth = 0usize;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => cleaned.push(c),
            _ => {}
        }
    }
    let (mut day, mut month, mut year, mut time, mut zone) = (None, None, None, None, None);
    for tok in cleaned
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        let tok = tok.trim_end_matches('.');
        let digits = !tok.is_empty() && tok.bytes().all(|c| c.is_ascii_digit());
        if digits {
            let n: u32 = tok.parse().ok()?;
            match tok.len() {
                1 | 2 if day.is_none() => day = Some(n),
                1 | 2 if year.is_none() => year = Some(if n < 50 { 2000 + n } else { 1900 + n }),
                3 if year.is_none() => year = Some(1900 + n),
                4 if year.is_none() => year = Some(n),
                _ => return None,
            }
        } else if tok.contains(':') {
            if time.is_some() {
                return None;
            }
            let mut fields = tok.split(':').map(|f| {
                (!f.is_empty() && f.len() <= 2 && f.bytes().all(|c| c.is_ascii_digit()))
                    .then(|| f.parse::<u32>().ok())
                    .flatten()
            });
            let h = fields.next()??;
            let m = fields.next()??;
            let sec = match fields.next() {
                Some(sec) => sec?,
                None => 0,
            };
            if fields.next().is_some() || h > 23 || m > 59 || sec > 60 {
                return None;
            }
            time = Some((h, m, sec));
        } else if let Some(sign @ ('+' | '-')) = tok.chars().next() {
            let num = &tok[1..];
            if num.len() != 4 || !num.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let v: i32 = num.parse().ok()?;
            let (hh, mm) = (v / 100, v % 100);
            if hh > 23 || mm > 59 {
                return None;
            }
            zone = Some(if sign == '-' {
                -(hh * 60 + mm)
            } else {
                hh * 60 + mm
            });
        } else if let Some(m) = month_number(tok) {
            month.get_or_insert(m);
        } else if time.is_some() && zone.is_none() {
            zone = match tok.to_ascii_uppercase().as_str() {
                "UT" | "UTC" | "GMT" | "Z" => Some(0),
                "EST" => Some(-300),
                "EDT" | "AST" => Some(-240),
                "CST" => Some(-360),
                "CDT" => Some(-300),
                "MST" => Some(-420),
                "MDT" => Some(-360),
                "PST" => Some(-480),
                "PDT" => Some(-420),
                t if t.len() == 1 && t.bytes().all(|c| c.is_ascii_alphabetic()) => Some(0),
                _ => None,
            };
        }
        // Anything else (the day name, an unknown zone name) is ignored.
    }
    let (day, month, year, (h, m, sec)) = (day?, month?, year?, time?);
    if !(1000..=9999).contains(&year) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let offset = zone.unwrap_or(0);
    let zone = if offset == 0 {
        "Z".to_owned()
    } else {
        let sign = if offset < 0 { '-' } else { '+' };
        format!("{sign}{:02}:{:02}", offset.abs() / 60, offset.abs() % 60)
    };
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}{zone}"
    ))
}

fn month_number(tok: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ];
    let t = tok.to_ascii_lowercase();
    if t.len() < 3 {
        return None;
    }
    let index = MONTHS.iter().position(|m| m.starts_with(t.as_str()))?;
    u32::try_from(index + 1).ok()
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crlf(s: &str) -> Vec<u8> {
        s.replace('\n', "\r\n").into_bytes()
    }

    fn summary(s: &str) -> MailSummary {
        summarize(&crlf(s)).expect("parses")
    }

    // --- RFC 2047 -------------------------------------------------------

    #[test]
    fn dovecot_example_from_and_subject() {
        assert_eq!(
            decode_header_value("=?UTF-8?B?5byg5LiJ?= <zhangsan@example.org>"),
            "张三 <zhangsan@example.org>"
        );
        assert_eq!(
            display_address("=?UTF-8?B?5byg5LiJ?= <zhangsan@example.org>").as_deref(),
            Some("张三 <zhangsan@example.org>")
        );
        assert_eq!(
            decode_header_value("=?UTF-8?B?5L2g5aW977yM5LiW55WM77ya5rWL6K+V6YKu5Lu2?="),
            "你好，世界：测试邮件"
        );
    }

    #[test]
    fn utf8_q_and_b() {
        assert_eq!(
            decode_header_value("=?UTF-8?Q?Caf=C3=A9_cr=C3=A8me?="),
            "Café crème"
        );
        assert_eq!(decode_header_value("=?utf-8?q?caf=c3=a9?="), "café");
        assert_eq!(
            decode_header_value("Re: =?UTF-8?B?SMOpbGxv?= world"),
            "Re: Héllo world"
        );
        assert_eq!(decode_header_value("Re:=?UTF-8?B?SMOpbGxv?="), "Re:Héllo");
        assert_eq!(decode_header_value("plain ascii"), "plain ascii");
        assert_eq!(decode_header_value("=?UTF-8*en?Q?hi?="), "hi");
    }

    #[test]
    fn rfc2047_examples_whitespace_rules() {
        assert_eq!(decode_header_value("(=?ISO-8859-1?Q?a?=)"), "(a)");
        assert_eq!(decode_header_value("(=?ISO-8859-1?Q?a?= b)"), "(a b)");
        assert_eq!(
            decode_header_value("(=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=)"),
            "(ab)"
        );
        assert_eq!(
            decode_header_value("(=?ISO-8859-1?Q?a?=  \r\n  =?ISO-8859-1?Q?b?=)"),
            "(ab)"
        );
        assert_eq!(decode_header_value("(=?ISO-8859-1?Q?a_b?=)"), "(a b)");
        assert_eq!(
            decode_header_value("(=?ISO-8859-1?Q?a?= =?ISO-8859-2?Q?_b?=)"),
            "(a b)"
        );
        assert_eq!(
            decode_header_value("=?US-ASCII?Q?Keith_Moore?= <moore@cs.utk.edu>"),
            "Keith Moore <moore@cs.utk.edu>"
        );
        assert_eq!(
            decode_header_value("=?ISO-8859-1?Q?Andr=E9?= Pirard"),
            "André Pirard"
        );
        assert_eq!(decode_header_value("=?iso-8859-15?B?yXTp?="), "Été");
    }

    #[test]
    fn character_split_across_adjacent_words() {
        // "你好" is 6 UTF-8 bytes, split 4 + 2 over two B words.
        assert_eq!(
            decode_header_value("=?UTF-8?B?5L2g5Q==?= =?UTF-8?B?pb0=?="),
            "你好"
        );
    }

    #[test]
    fn cjk_charsets() {
        assert_eq!(
            decode_header_value("=?gb2312?B?1tDOxLLiytTTyrz+?="),
            "中文测试邮件"
        );
        assert_eq!(decode_header_value("=?GBK?B?1tDOxJx51Ic=?="), "中文測試");
        assert_eq!(
            decode_header_value("=?GB18030?B?1tDOxLLiytTTyrz+?="),
            "中文测试邮件"
        );
        assert_eq!(decode_header_value("=?big5?B?tPq41bZspfM=?="), "測試郵件");
        assert_eq!(
            decode_header_value("=?ISO-2022-JP?B?GyRCRnxLXDhsJE4lRiU5JUgbKEI=?="),
            "日本語のテスト"
        );
        // Two ISO-2022-JP words, each ending back in ASCII (as Python and
        // most mailers fold long subjects).
        assert_eq!(
            decode_header_value(
                "=?iso-2022-jp?b?GyRCRnxLXBsoQg==?=\r\n =?iso-2022-jp?b?GyRCOGwkThsoQg==?="
            ),
            "日本語の"
        );
        assert_eq!(
            decode_header_value("=?eucgb2312_cn?b?1tDOxA==?= =?big5_tw?b?tPq41Q==?="),
            "中文測試"
        );
        assert_eq!(decode_header_value("=?shift_jis?B?k/qWe4zq?="), "日本語");
        assert_eq!(decode_header_value("=?koi8-r?B?8NLJ18XU?="), "Привет");
    }

    #[test]
    fn unknown_and_broken_words() {
        // Unknown charset: UTF-8 when valid, else windows-1252.
        assert_eq!(decode_header_value("=?x-unknown?Q?caf=C3=A9?="), "café");
        assert_eq!(decode_header_value("=?foo-bar?Q?caf=E9?="), "café");
        assert_eq!(decode_header_value("=?utf-7?Q?Hi_+AKM-1?="), "Hi £1");
        for s in [
            "=?utf-8?B?",
            "=?utf-8?X?abc?=",
            "=?",
            "=?utf-8?Q?abc",
            "=??Q?a?=",
            "a =?utf-8?q?b",
        ] {
            assert_eq!(decode_header_value(s), s);
        }
        // Invalid UTF-8 inside a word is replaced, not a panic.
        assert_eq!(decode_header_value("=?utf-8?Q?a=FF?="), "a\u{FFFD}");
        // Bad base64 characters are skipped.
        assert_eq!(decode_header_value("=?utf-8?B?SMOp*bGxv?="), "Héllo");
        assert_eq!(
            decode_header_value("Line\r\n\tfolded\u{0}  twice "),
            "Line folded twice"
        );
    }

    // --- addresses ------------------------------------------------------

    #[test]
    fn from_display_forms() {
        let cases = [
            (
                "\"Doe, John\" <john@example.com>",
                "Doe, John <john@example.com>",
            ),
            ("John Doe <john@example.com>", "John Doe <john@example.com>"),
            ("<john@example.com>", "john@example.com"),
            ("john@example.com", "john@example.com"),
            ("john@example.com (John Doe)", "John Doe <john@example.com>"),
            (
                "\"john@example.com\" <john@example.com>",
                "john@example.com",
            ),
            (
                "=?utf-8?Q?Ren=C3=A9?= <rene@example.fr>",
                "René <rene@example.fr>",
            ),
            (
                "\"=?utf-8?Q?Ren=C3=A9_D?=\" <rene@example.fr>",
                "René D <rene@example.fr>",
            ),
            (
                "Team: alice@example.com, bob@example.com;",
                "alice@example.com",
            ),
            ("a@example.com, b@example.com", "a@example.com"),
            ("undisclosed-recipients:;", "undisclosed-recipients"),
            ("张三 <zhangsan@example.org>", "张三 <zhangsan@example.org>"),
            ("\"Broken <x@example.com", "Broken <x@example.com>"),
        ];
        for (raw, want) in cases {
            assert_eq!(display_address(raw).as_deref(), Some(want), "{raw}");
        }
        assert_eq!(display_address(""), None);
        assert_eq!(display_address("  "), None);
    }

    // --- snippets -------------------------------------------------------

    #[test]
    fn snippet_rules() {
        assert_eq!(make_snippet("  Hello \r\n\t world  ", 200), "Hello world");
        assert_eq!(make_snippet("abcdef", 6), "abcdef");
        assert_eq!(make_snippet("abcdefg", 6), "abcde…");
        assert_eq!(make_snippet("abc def", 4), "abc…");
        assert_eq!(make_snippet("abc defgh", 6), "abc d…");
        assert_eq!(make_snippet("日本語のテキスト", 5), "日本語の…");
        assert_eq!(make_snippet("anything", 0), "");
        assert_eq!(make_snippet("ab", 1), "…");
        assert_eq!(make_snippet("", 10), "");
        assert_eq!(
            make_snippet("Hi\u{200B}\u{FEFF} there\u{AD}", 20),
            "Hi there"
        );
        assert_eq!(
            make_snippet("Preview&zwnj;\u{200C}\u{A0}\u{200C}\u{A0}text", 20),
            "Preview&zwnj; text"
        );
        assert_eq!(make_snippet("می\u{200C}خواهم", 20), "می\u{200C}خواهم");
        let long = "word ".repeat(100);
        let s = make_snippet(&long, 200);
        assert_eq!(s.chars().count(), 200);
        assert!(s.ends_with("word…"));
        let cjk = "中".repeat(300);
        let s = make_snippet(&cjk, 200);
        assert_eq!(s.chars().count(), 200);
        assert!(s.ends_with("中…"));
    }

    // --- modified UTF-7 -------------------------------------------------

    #[test]
    fn modified_utf7() {
        assert_eq!(decode_modified_utf7("&ZeVnLIqe-"), "日本語");
        assert_eq!(decode_modified_utf7("&AMk-t&AOk-"), "Été");
        assert_eq!(decode_modified_utf7("INBOX"), "INBOX");
        assert_eq!(decode_modified_utf7("&-"), "&");
        assert_eq!(decode_modified_utf7("Sent &- Drafts"), "Sent & Drafts");
        assert_eq!(
            decode_modified_utf7("~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
            "~peter/mail/台北/日本語"
        );
        assert_eq!(decode_modified_utf7("&2D3eAA-"), "😀"); // surrogate pair
        for bad in [
            "&ZeVnLIqe",
            "Tom & Jerry",
            "&Jjo!",
            "&AM-",
            "&2D0-",
            "日本語",
            "&ZeVn.Iqe-",
            "a\u{7}b",
        ] {
            assert_eq!(decode_modified_utf7(bad), bad);
        }
    }

    // --- dates ----------------------------------------------------------

    #[test]
    fn dates() {
        let d = |s: &str| parse_date(s);
        assert_eq!(
            d("Tue, 1 Jul 2003 10:52:37 +0200").as_deref(),
            Some("2003-07-01T10:52:37+02:00")
        );
        assert_eq!(
            d("Mon, 15 Jan 2024 08:00:00 -0500 (EST)").as_deref(),
            Some("2024-01-15T08:00:00-05:00")
        );
        assert_eq!(
            d("1 Jul 03 10:52 GMT").as_deref(),
            Some("2003-07-01T10:52:00Z")
        );
        assert_eq!(
            d("Thu, 29 Feb 2024 23:59:60 +0000").as_deref(),
            Some("2024-02-29T23:59:60Z")
        );
        assert_eq!(
            d("Fri, 21 Nov 1997 09:55:06 -0600").as_deref(),
            Some("1997-11-21T09:55:06-06:00")
        );
        assert_eq!(
            d("Tue Jul  1 10:52:37 2003").as_deref(),
            Some("2003-07-01T10:52:37Z")
        );
        assert_eq!(
            d("Wed, 5 June 2024 7:03:09 PDT").as_deref(),
            Some("2024-06-05T07:03:09-07:00")
        );
        assert_eq!(
            d("Mon, 3 Mar 2025 10:00:00 +0530").as_deref(),
            Some("2025-03-03T10:00:00+05:30")
        );
        for bad in [
            "garbage",
            "31 Feb 2024 10:00:00 +0000",
            "1 Jul 2003 25:00:00 +0000",
            "1 Jul 2003",
            "1 Foo 2003 10:00",
            "1 Jul 2003 10:00 +99",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
        // Through summarize: unparseable dates are kept raw.
        let m = summary("From: a@example.com\nDate:  next   tuesday\n\nx\n");
        assert_eq!(m.date.as_deref(), Some("next tuesday"));
    }

    // --- whole messages -------------------------------------------------

    #[test]
    fn simple_message_with_encoded_headers() {
        let m = summary(
            "Return-Path: <zhangsan@example.org>\n\
             From: =?UTF-8?B?5byg5LiJ?= <zhangsan@example.org>\n\
             To: alice@example.com\n\
             Subject: =?UTF-8?B?5L2g5aW977yM5LiW55WM77ya5rWL6K+V6YKu5Lu2?=\n\
             Message-ID: <20240101.abc@example.org>\n\
             Date: Mon, 1 Jan 2024 12:00:00 +0800\n\
             Content-Type: text/plain; charset=utf-8\n\
             \n\
             你好 Alice，\n\
             这是一封包含中文的测试邮件。\n",
        );
        assert_eq!(m.from.as_deref(), Some("张三 <zhangsan@example.org>"));
        assert_eq!(m.subject.as_deref(), Some("你好，世界：测试邮件"));
        assert_eq!(m.message_id.as_deref(), Some("20240101.abc@example.org"));
        assert_eq!(m.date.as_deref(), Some("2024-01-01T12:00:00+08:00"));
        assert_eq!(m.snippet, "你好 Alice， 这是一封包含中文的测试邮件。");
    }

    #[test]
    fn folded_headers_and_missing_fields() {
        let m = summary(
            "Subject: =?ISO-8859-1?Q?Gr=FC=DFe?=\n =?ISO-8859-1?Q?_aus_K=F6ln?=\n\tund Bonn\nX-Other: 1\n\nBody\n",
        );
        assert_eq!(m.subject.as_deref(), Some("Grüße aus Köln und Bonn"));
        assert_eq!(m.from, None);
        assert_eq!(m.message_id, None);
        assert_eq!(m.date, None);
        assert_eq!(m.snippet, "Body");
        let m = summary("Subject:\nFrom: \n\n\n");
        assert_eq!(m.subject.as_deref(), Some(""));
        assert_eq!(m.from, None);
        assert_eq!(m.snippet, "");
    }

    #[test]
    fn raw_8bit_headers() {
        let m = summary("From: Jürgen <j@example.de>\nSubject: Grüße\n\nx\n");
        assert_eq!(m.from.as_deref(), Some("Jürgen <j@example.de>"));
        assert_eq!(m.subject.as_deref(), Some("Grüße"));
        // Raw GBK bytes in Subject, charset taken from Content-Type.
        let mut raw = b"Subject: ".to_vec();
        raw.extend_from_slice(b"\xb2\xe2\xca\xd4\xd6\xf7\xcc\xe2");
        raw.extend_from_slice(b"\r\nContent-Type: text/plain; charset=GBK\r\n\r\nbody\r\n");
        assert_eq!(
            summarize(&raw).expect("parses").subject.as_deref(),
            Some("测试主题")
        );
        // Raw Latin-1 with no charset anywhere: windows-1252.
        let raw = b"Subject: Gr\xfc\xdfe\n\nx\n";
        assert_eq!(
            summarize(raw).expect("parses").subject.as_deref(),
            Some("Grüße")
        );
    }

    #[test]
    fn base64_utf8_body() {
        let m = summary(
            "From: a@example.com\nContent-Type: text/plain; charset=\"UTF-8\"\nContent-Transfer-Encoding: base64\n\n\
             SMOpbGxvIHfDtnJsZCDigJQgw7xuw69j\nb2RlIOKckyDkvaDlpb0=\n",
        );
        assert_eq!(m.snippet, "Héllo wörld — ünïcode ✓ 你好");
    }

    #[test]
    fn quoted_printable_latin1_body() {
        let m = summary(
            "From: a@example.com\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n\
             Gr=FC=DFe aus K=F6ln, =E0 bient=F4t. Sehr lange Zeile mit weichem =\nUmbruch =3D ok.\n",
        );
        assert_eq!(
            m.snippet,
            "Grüße aus Köln, à bientôt. Sehr lange Zeile mit weichem Umbruch = ok."
        );
    }

    #[test]
    fn legacy_charset_bodies() {
        let body = |charset: &str, cte: &str, bytes: &[u8]| {
            let mut raw =
                format!("From: a@example.com\r\nContent-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n")
                    .into_bytes();
            raw.extend_from_slice(bytes);
            summarize(&raw).expect("parses").snippet
        };
        assert_eq!(
            body(
                "gb2312",
                "base64",
                b"xPq6w6Os1eLKx9K7t+Ky4srU08q8/qGjx+uy6crVuL28/qGj"
            ),
            "您好，这是一封测试邮件。请查收附件。"
        );
        assert_eq!(
            body(
                "big5",
                "quoted-printable",
                b"=B3o=ACO=C1c=C5=E9=A4=A4=A4=E5=AA=BA=B4=FA=B8=D5=B6l=A5=F3"
            ),
            "這是繁體中文的測試郵件"
        );
        assert_eq!(
            body(
                "ISO-2022-JP",
                "7bit",
                b"\x1b$B$3$s$K$A$O!\"@$3&!#%F%9%H%a!<%k$G$9!#\x1b(B"
            ),
            "こんにちは、世界。テストメールです。"
        );
        assert_eq!(
            body("Shift_JIS", "8bit", b"\x82\xa8\x90\xa2\x98b\x82\xc9\x82\xc8\x82\xc1\x82\xc4\x82\xa8\x82\xe8\x82\xdc\x82\xb7\x81B"),
            "お世話になっております。"
        );
        assert_eq!(
            body(
                "koi8-r",
                "8bit",
                b"\xfa\xc4\xd2\xc1\xd7\xd3\xd4\xd7\xd5\xca\xd4\xc5, \xdc\xd4\xcf \xd4\xc5\xd3\xd4."
            ),
            "Здравствуйте, это тест."
        );
        assert_eq!(
            body("windows-1252", "8bit", b"\x93Quoted\x94 \x96 50\x80"),
            "“Quoted” – 50€"
        );
        assert_eq!(body("iso-8859-15", "8bit", b"Prix: 5\xa4"), "Prix: 5€");
        // Bad charset name: UTF-8 if it is, else windows-1252.
        assert_eq!(
            body("x-no-such-charset", "8bit", "naïve".as_bytes()),
            "naïve"
        );
        assert_eq!(body("\"bogus\"", "8bit", b"na\xefve"), "naïve");
        // Declared us-ascii but really UTF-8.
        assert_eq!(body("us-ascii", "8bit", "déjà vu".as_bytes()), "déjà vu");
    }

    const ALTERNATIVE: &str = "From: \"Shop\" <news@shop.example>\n\
Subject: Offer\n\
MIME-Version: 1.0\n\
Content-Type: multipart/alternative; boundary=\"b1\"\n\
\n\
This is a multi-part message in MIME format.\n\
--b1\n\
Content-Type: text/html; charset=utf-8\n\
\n\
<p>HTML version</p>\n\
--b1\n\
Content-Type: text/plain; charset=utf-8\n\
Content-Transfer-Encoding: quoted-printable\n\
\n\
Plain version =E2=80=94 here.\n\
--b1--\n\
epilogue\n";

    #[test]
    fn multipart_alternative_prefers_plain() {
        let m = summary(ALTERNATIVE);
        assert_eq!(m.snippet, "Plain version — here.");
        assert_eq!(m.from.as_deref(), Some("Shop <news@shop.example>"));
        // Bare LF line endings work the same.
        let m = summarize(ALTERNATIVE.as_bytes()).expect("parses");
        assert_eq!(m.snippet, "Plain version — here.");
    }

    #[test]
    fn html_only() {
        let m = summary(
            "From: a@example.com\nContent-Type: text/html; charset=utf-8\n\n\
             <!DOCTYPE html><html><head><title>Title here</title>\n\
             <style>p { color: red; } /* <b>not text</b> */</style>\n\
             <script type=\"text/javascript\">var x = \"<p>no</p>\";</script></head>\n\
             <body><!-- a comment --><div class=\"x\" title=\"a > b\">Hello&nbsp;<b>Wor</b>ld</div>\n\
             <p>Tom &amp; Jerry &lt;3 &quot;quotes&quot; &#39;single&#39; &#x263A; &#8212; &eacute;t&eacute; &#150; &bogus; &amp</p>\n\
             <br/>a < b and 1<2\n\
             <SCRIPT>alert(1)</SCRIPT>End</body></html>\n",
        );
        assert_eq!(
            m.snippet,
            "Hello World Tom & Jerry <3 \"quotes\" 'single' ☺ — été – &bogus; & a < b and 1<2 End"
        );
    }

    #[test]
    fn html_charset_from_meta_and_preheader_padding() {
        let mut raw = b"From: a@example.com\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".to_vec();
        raw.extend_from_slice(b"<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset=iso-8859-1\"></head>");
        raw.extend_from_slice(b"<body><div style=\"display:none\">Pr\xe9header&zwnj;&nbsp;&zwnj;&nbsp;&#8203;&#173;</div><p>Caf\xe9</p></body></html>");
        assert_eq!(summarize(&raw).expect("parses").snippet, "Préheader Café");
    }

    #[test]
    fn mixed_with_attachments_and_nesting() {
        let m = summary(
            "From: a@example.com\n\
Content-Type: multipart/mixed; boundary=outer\n\
\n\
--outer\n\
Content-Type: text/plain; name=\"notes.txt\"\n\
Content-Disposition: attachment; filename=\"notes.txt\"\n\
\n\
Attached notes, not the body.\n\
--outer\n\
Content-Type: multipart/related; boundary=\"rel\"\n\
\n\
--rel\n\
Content-Type: multipart/alternative; boundary=\"alt\"\n\
\n\
--alt\n\
Content-Type: text/plain; charset=utf-8\n\
Content-Transfer-Encoding: base64\n\
\n\
TmVzdGVkIHBsYWluIGJvZHku\n\
--alt\n\
Content-Type: text/html; charset=utf-8\n\
\n\
<p>Nested html body.</p><img src=\"cid:logo\">\n\
--alt--\n\
--rel\n\
Content-Type: image/png\n\
Content-ID: <logo>\n\
Content-Transfer-Encoding: base64\n\
\n\
iVBORw0KGgo=\n\
--rel--\n\
--outer\n\
Content-Type: application/pdf; name=report.pdf\n\
Content-Disposition: attachment; filename*=UTF-8''r%C3%A9port.pdf\n\
Content-Transfer-Encoding: base64\n\
\n\
JVBERi0xLjQK\n\
--outer--\n",
        );
        assert_eq!(m.snippet, "Nested plain body.");
    }

    #[test]
    fn mixed_html_body_before_text_footer() {
        let m = summary(
            "From: a@example.com\nContent-Type: multipart/mixed; boundary=\"x\"\n\n--x\nContent-Type: text/html\n\n<p>The body</p>\n\
             --x\nContent-Type: text/plain\n\n-- \nlist footer\n--x--\n",
        );
        assert_eq!(m.snippet, "The body");
    }

    #[test]
    fn only_named_text_part_is_used_as_last_resort() {
        let m = summary(
            "From: a@example.com\nContent-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/html; name=\"message.html\"\n\n\
             <p>Ticket updated</p>\n--x\nContent-Type: text/plain\nContent-Disposition: attachment\n\nno\n--x--\n",
        );
        assert_eq!(m.snippet, "Ticket updated");
    }

    #[test]
    fn forwarded_message_and_digest() {
        let m = summary(
            "From: a@example.com\nContent-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: message/rfc822\n\n\
             From: b@example.com\nSubject: inner\nContent-Type: text/plain\n\nInner text.\n--x--\n",
        );
        assert_eq!(m.snippet, "Inner text.");
        let m = summary(
            "From: a@example.com\nContent-Type: multipart/digest; boundary=d\n\n--d\n\nFrom: b@example.com\n\nDigest entry.\n--d--\n",
        );
        assert_eq!(m.snippet, "Digest entry.");
    }

    #[test]
    fn quoted_reply_is_skipped() {
        let m = summary(
            "From: a@example.com\nSubject: Re: lunch\n\nSounds good, see you at noon.\n\nOn Mon, 1 Jan 2024, Bob wrote:\n> Lunch tomorrow?\n> Bob\n",
        );
        assert_eq!(m.snippet, "Sounds good, see you at noon.");
        let m = summary("From: a@example.com\n\n> only quoted text\n");
        assert_eq!(m.snippet, "> only quoted text");
        let m =
            summary("From: a@example.com\n\nSee you.\nBob\n-- \nBob Smith | ACME | +1 555 0100\n");
        assert_eq!(m.snippet, "See you. Bob");
        let m = summary("From: a@example.com\n\n-- \nonly a signature\n");
        assert_eq!(m.snippet, "-- only a signature");
    }

    #[test]
    fn long_body_is_cut_to_200_chars() {
        let body = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(20);
        let m = summary(&format!("From: a@example.com\nSubject: long\n\n{body}"));
        assert!(m.snippet.chars().count() <= SNIPPET_CHARS);
        assert!(m.snippet.chars().count() >= SNIPPET_CHARS - 10);
        assert!(m.snippet.ends_with('…'));
        assert!(m.snippet.starts_with("Lorem ipsum dolor sit amet"));
        let body = "长".repeat(500);
        let m = summary(&format!("From: a@example.com\n\n{body}"));
        assert_eq!(m.snippet.chars().count(), SNIPPET_CHARS);
    }

    #[test]
    fn message_ids() {
        assert_eq!(parse_message_id("<a.b@c>").as_deref(), Some("a.b@c"));
        assert_eq!(
            parse_message_id("  (comment) <a.b@c> ").as_deref(),
            Some("a.b@c")
        );
        assert_eq!(parse_message_id("a.b@c").as_deref(), Some("a.b@c"));
        assert_eq!(parse_message_id("<>"), None);
        assert_eq!(parse_message_id(""), None);
    }

    #[test]
    fn rfc2231_parameters() {
        let (mime, params) = parse_params(
            "application/pdf; name*0*=utf-8''r%C3%A9; name*1=\"port.pdf\"; x=\"a\\\"b\"",
        );
        assert_eq!(mime, "application/pdf");
        assert_eq!(param(&params, "name"), Some("réport.pdf"));
        assert_eq!(param(&params, "x"), Some("a\"b"));
        let (_, params) = parse_params("text/plain; charset*=us-ascii'en'utf-8");
        assert_eq!(param(&params, "charset"), Some("utf-8"));
    }

    // --- broken input ---------------------------------------------------

    #[test]
    fn not_a_message() {
        assert_eq!(summarize(b""), Err(MimeError::NoHeaders));
        assert_eq!(summarize(b" \r\n\r\n"), Err(MimeError::NoHeaders));
        assert_eq!(summarize(b"\r\nbody only\r\n"), Err(MimeError::NoHeaders));
        assert_eq!(
            summarize(b"just some text\n\nmore text\n"),
            Err(MimeError::NoHeaders)
        );
        assert_eq!(
            summarize(b"Subject: no body separator\r\n"),
            Err(MimeError::NoSeparator)
        );
        assert_eq!(summarize(b"Subject: x"), Err(MimeError::NoSeparator));
        assert!(summarize(b"Subject: x\n\n").is_ok());
    }

    #[test]
    fn broken_messages_degrade() {
        // Truncated base64.
        let m = summary("Subject: t\nContent-Transfer-Encoding: base64\n\nSMOpbGxvIHfDtnJsZCDi");
        assert!(m.snippet.starts_with("Héllo wörld"), "{}", m.snippet);
        // Multipart without a boundary parameter: the delimiter is guessed.
        let m = summary("Subject: t\nContent-Type: multipart/alternative\n\n--zz\nContent-Type: text/plain\n\nGuessed.\n--zz--\n");
        assert_eq!(m.snippet, "Guessed.");
        // Boundary parameter that matches nothing, and no delimiter-like line.
        let m = summary("Subject: t\nContent-Type: multipart/mixed; boundary=nope\n\nJust text.\n");
        assert_eq!(m.snippet, "Just text.");
        // Missing closing delimiter, part cut inside its header.
        let m = summary("Subject: t\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nFirst.\n--b\nContent-Ty");
        assert_eq!(m.snippet, "First.");
        // Part without a header block.
        let m = summary("Subject: t\nContent-Type: multipart/mixed; boundary=b\n\n--b\nNo headers here.\n--b--\n");
        assert_eq!(m.snippet, "No headers here.");
        // Unterminated quote in Content-Type, unknown transfer encoding.
        let m = summary("Subject: t\nContent-Type: text/plain; charset=\"utf-8\nContent-Transfer-Encoding: x-weird\n\nStill here.\n");
        assert_eq!(m.snippet, "Still here.");
        // Unterminated tag and unclosed script.
        let m = summary("Subject: t\nContent-Type: text/html\n\n<p>Visible</p><a href=\"x");
        assert_eq!(m.snippet, "Visible");
        let m = summary("Subject: t\nContent-Type: text/html\n\n<p>Before</p><script>never ends");
        assert_eq!(m.snippet, "Before");
        // Not text at all.
        let m = summary("Subject: t\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n");
        assert_eq!(m.snippet, "");
        // Lines that are no header field are skipped; mbox "From " line tolerated.
        let m = summary(
            "From sender@example.com Mon Jan  1 00:00:00 2024\nnot a header\nSubject: ok\n\nbody\n",
        );
        assert_eq!(m.subject.as_deref(), Some("ok"));
    }

    #[test]
    fn pathological_inputs_stay_linear() {
        let started = std::time::Instant::now();
        let html = format!("<p>x</p>{}", "<title>".repeat(100_000));
        assert_eq!(make_snippet(&html_to_text(&html), 20), "x");
        let ct = format!("text/plain; {}charset=utf-8", "a*1*=b; ".repeat(50_000));
        let _ = parse_params(&ct);
        let words = "=?utf-8?q?a?= ".repeat(50_000);
        assert_eq!(decode_header_value(&words).len(), 50_000);
        let mut big = b"Subject: big\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
        big.extend(
            std::iter::repeat_n(
                b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n".as_slice(),
                100_000,
            )
            .flatten(),
        );
        big.extend_from_slice(
            b"--b\r\nContent-Type: text/plain\r\n\r\nafter the blob\r\n--b--\r\n",
        );
        assert_eq!(summarize(&big).expect("parses").snippet, "after the blob");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let mut msg = String::from("Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n");
        for i in 1..200 {
            msg.push_str(&format!(
                "--b{}\nContent-Type: multipart/mixed; boundary=b{i}\n\n",
                i - 1
            ));
        }
        msg.push_str("--b199\nContent-Type: text/plain\n\ndeep text\n");
        let m = summary(&msg);
        assert_eq!(m.subject.as_deref(), Some("deep"));
        assert_eq!(m.snippet, "");
    }

    #[test]
    fn no_panic_on_truncations_and_noise() {
        let mut samples: Vec<Vec<u8>> = vec![crlf(ALTERNATIVE)];
        let mut raw = b"Subject: =?gb2312?B?1tDOxLLiytTTyrz+?=\r\nContent-Type: text/plain; charset=gb2312\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n".to_vec();
        raw.extend_from_slice(b"=C4=FA=BA=C3 &#x; <b =\r\n=?utf-8?B?5L2g\r\n");
        samples.push(raw);
        for sample in &samples {
            for end in 0..=sample.len() {
                let _ = summarize(&sample[..end]);
                let _ = decode_header_value(&String::from_utf8_lossy(&sample[..end]));
                let _ = decode_modified_utf7(&String::from_utf8_lossy(&sample[..end]));
            }
        }
        // Pseudo-random bytes from a small LCG, biased towards syntax characters.
        let alphabet = b"=?<>&;#:-\r\n \"'()/abcBQxyz0189+,\xff\xc3\xa9";
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..300 {
            let mut buf = b"Content-Type: multipart/mixed; boundary=a\r\nSubject: ".to_vec();
            for _ in 0..200 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                buf.push(alphabet[(state >> 33) as usize % alphabet.len()]);
            }
            let _ = summarize(&buf);
            let text = String::from_utf8_lossy(&buf);
            let _ = decode_header_value(&text);
            let _ = display_address(&text);
            let _ = decode_modified_utf7(&text);
            let _ = html_to_text(&text);
            let _ = parse_date(&text);
            let _ = make_snippet(&text, 7);
        }
    }
}
