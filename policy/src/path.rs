//! HTTP request path normalization: the one place that turns the path a client sent into the
//! path policy matches against (and the proxy forwards).
//!
//! Flow: the proxy hands the raw request-target path to [`normalize_path`]; a path that is
//! ambiguous (could mean different things to Trellis and to the application behind it) is
//! refused with a [`PathError`] and the request is denied; otherwise policy matches the
//! normalized path, and the proxy forwards that same normalized path, so the application sees
//! exactly what was checked.
//!
//! The steps, in order:
//! 1. the query (`?` and after) is dropped;
//! 2. the path must start with `/`;
//! 3. every byte is checked: raw `\`, NUL, other control characters, space, `#` and non-ASCII
//!    bytes are refused; `%XX` escapes must be two hex digits; `%00`, encoded control
//!    characters, `%2F` (`/`) and `%5C` (`\`) are refused; escapes of unreserved characters
//!    (`A-Z a-z 0-9 - . _ ~`) are decoded; other escapes are kept with uppercase hex;
//! 4. repeated slashes are merged (`//` → `/`);
//! 5. a `.` or `..` segment with `;` parameters (`..;`, `..;x=1`, `.;x`, `..%3B`) is refused:
//!    Java servers drop parameters before resolving dot segments, so `/api/..;/admin` is
//!    `/admin` to them;
//! 6. dot segments are removed as in RFC 3986 §5.2.4 (`/a/./b` → `/a/b`, `/a/../b` → `/b`,
//!    `/..` → `/`, and a trailing `.` or `..` segment leaves a trailing `/`).
//!
//! Other `;` parameters are kept (and forwarded: `;jsessionid=` is real), but DENY path rules
//! are also matched against the path without them ([`without_parameters`]), so `/admin;x`
//! cannot slip past a DENY on `/admin` to a server that ignores the parameter.
//!
//! Decoding happens before dot-segment removal, so `/api/%2e%2e/admin` is `/admin`. Slashes
//! are merged before dot segments are removed, so `/a//../b` is `/b` (as most servers read it).

use std::borrow::Cow;

/// Why a request path was refused. A flow with such a path is denied whatever the policies say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("encoded '/' in path")]
    EncodedSlash,
    #[error("encoded '\\' in path")]
    EncodedBackslash,
    #[error("'\\' in path")]
    Backslash,
    #[error("NUL byte in path")]
    Nul,
    #[error("control character in path")]
    Control,
    #[error("non-ASCII byte in path")]
    NonAscii,
    #[error("invalid percent-escape in path")]
    InvalidEscape,
    #[error("character {0:?} not allowed in path")]
    ForbiddenChar(char),
    #[error("'.' or '..' segment with a ';' parameter, or after a segment of only parameters, in path")]
    DotSegmentParameter,
}

impl PathError {
    /// A short, stable, machine-readable name (used in JSON output and metrics labels).
    pub fn code(&self) -> &'static str {
        match self {
            PathError::NotAbsolute => "not-absolute",
            PathError::EncodedSlash => "encoded-slash",
            PathError::EncodedBackslash => "encoded-backslash",
            PathError::Backslash => "backslash",
            PathError::Nul => "nul",
            PathError::Control => "control-character",
            PathError::NonAscii => "non-ascii",
            PathError::InvalidEscape => "invalid-escape",
            PathError::ForbiddenChar(_) => "forbidden-character",
            PathError::DotSegmentParameter => "dot-segment-parameter",
        }
    }
}

/// Normalizes a request path for matching and forwarding (see the module docs for the steps).
///
/// Returns the input unchanged (borrowed, no allocation) when it is already normal, which is
/// the common case on the hot path.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let path = match raw.find('?') {
        Some(q) => &raw[..q],
        None => raw,
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let (rewrite, semicolon) = check_bytes(path)?;
    if !rewrite {
        if semicolon {
            refuse_dot_parameters(path)?;
        }
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path)?;
    refuse_dot_parameters(&decoded)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Checks every byte; returns whether the path needs rewriting (escapes, `//`, dot segments)
/// and whether it holds a raw `;`.
fn check_bytes(path: &str) -> Result<(bool, bool), PathError> {
    let bytes = path.as_bytes();
    let mut rewrite = false;
    let mut semicolon = false;
    for (i, &b) in bytes.iter().enumerate() {
        check_raw_byte(b)?;
        match b {
            b'%' => rewrite = true,
            b'/' => rewrite |= starts_odd_segment(&bytes[i + 1..]),
            b';' => semicolon = true,
            _ => {}
        }
    }
    Ok((rewrite, semicolon))
}

/// Where a segment's parameters start: its first `;` or `%3B` (escapes are uppercase here).
fn parameter_start(segment: &str) -> Option<usize> {
    match (segment.find(';'), segment.find("%3B")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuses `..;`, `..;x=1`, `.;x`, `..%3B` segments: Java servers (Tomcat, Spring, Jetty)
/// drop `;` parameters before resolving dot segments, so `/api/..;/admin` is `/admin` to
/// them, while here it would be a plain segment under `/api/`. `path` has its unreserved
/// escapes decoded and other escapes uppercased.
///
/// Also refuses a `.` or `..` after a segment of only parameters (`/x/;/../admin`): here the
/// `..` removes the `;` segment (`/x/admin`), there the emptied segment is merged away first
/// and the `..` removes `x` (`/admin`). A lone `/;jsessionid=…` stays allowed.
fn refuse_dot_parameters(path: &str) -> Result<(), PathError> {
    let mut only_parameters_seen = false;
    for segment in path.split('/') {
        let end = parameter_start(segment);
        let name = &segment[..end.unwrap_or(segment.len())];
        let dots = matches!(name, "." | "..");
        if dots && (end.is_some() || only_parameters_seen) {
            return Err(PathError::DotSegmentParameter);
        }
        only_parameters_seen |= end.is_some() && name.is_empty();
    }
    Ok(())
}

/// A normalized path with every segment's `;` parameters removed (`/admin;x=1/a;b` →
/// `/admin/a`; `%3B` counts as `;`), and slashes merged again: the path as a Java server
/// (Tomcat, Spring) maps it. DENY path rules are matched against this too, so `/admin;` cannot
/// slip past a DENY on `/admin`. `None` when the path has no parameters (the common case).
pub(crate) fn without_parameters(path: &str) -> Option<String> {
    parameter_start(path)?;
    let stripped: Vec<&str> = path.split('/').map(|seg| &seg[..parameter_start(seg).unwrap_or(seg.len())]).collect();
    // Dot segments with parameters were refused, so removing parameters creates none; this
    // only merges the slashes left by emptied segments (`/;x/a` → `/a`).
    Some(remove_dot_segments(&stripped.join("/")))
}

/// True if the segment right after a '/' is empty (a `//`), `.` or `..`.
fn starts_odd_segment(rest: &[u8]) -> bool {
    let seg_end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let seg = &rest[..seg_end];
    // A lone trailing '/' (empty last segment) is normal; an empty segment before another '/'
    // is a `//`.
    (seg.is_empty() && seg_end < rest.len()) || seg == b"." || seg == b".."
}

fn check_raw_byte(b: u8) -> Result<(), PathError> {
    match b {
        0 => Err(PathError::Nul),
        0x01..=0x1f | 0x7f => Err(PathError::Control),
        0x80..=0xff => Err(PathError::NonAscii),
        b'\\' => Err(PathError::Backslash),
        b' ' | b'#' => Err(PathError::ForbiddenChar(b as char)),
        _ => Ok(()),
    }
}

/// Decodes escapes of unreserved characters, uppercases the others, refuses the dangerous ones.
fn decode(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b as char);
            i += 1;
            continue;
        }
        let v = escape_value(bytes.get(i + 1..i + 3))?;
        push_escape(&mut out, v)?;
        i += 3;
    }
    Ok(out)
}

fn escape_value(hex: Option<&[u8]>) -> Result<u8, PathError> {
    match hex {
        Some(&[h, l]) => match (hex_digit(h), hex_digit(l)) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(PathError::InvalidEscape),
        },
        _ => Err(PathError::InvalidEscape),
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_escape(out: &mut String, v: u8) -> Result<(), PathError> {
    match v {
        0 => return Err(PathError::Nul),
        0x01..=0x1f | 0x7f => return Err(PathError::Control),
        b'/' => return Err(PathError::EncodedSlash),
        b'\\' => return Err(PathError::EncodedBackslash),
        _ => {}
    }
    if is_unreserved(v) {
        out.push(v as char);
    } else {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        out.push('%');
        out.push(HEX[usize::from(v >> 4)] as char);
        out.push(HEX[usize::from(v & 0xf)] as char);
    }
    Ok(())
}

/// RFC 3986 §2.3 unreserved characters.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Merges repeated slashes, then removes `.` and `..` segments (RFC 3986 §5.2.4).
/// `path` starts with '/' and holds no encoded '/'.
fn remove_dot_segments(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "" | "." => {}
            ".." => {
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
            }
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
        if last && matches!(seg, "" | "." | "..") {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        match normalize_path(raw) {
            Ok(p) => p.into_owned(),
            Err(e) => panic!("{raw:?}: {e}"),
        }
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for p in ["/", "/api", "/api/", "/api/v1/items", "/a.b/c..d/.e/f.", "/~x/-_/:@!$&'()*+,;="] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(q)) if q == p), "{p}");
        }
    }

    #[test]
    fn query_is_stripped() {
        assert!(matches!(normalize_path("/a?x=1"), Ok(Cow::Borrowed("/a"))));
        assert_eq!(ok("/a/../b?x=/../c"), "/b");
        assert_eq!(ok("/?"), "/");
        // Whatever follows '?' is not checked: it is not part of the path.
        assert_eq!(ok("/a?%zz\\"), "/a");
    }

    #[test]
    fn dot_segments() {
        let cases = [
            ("/api/../admin", "/admin"),
            ("/api/./x", "/api/x"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/.", "/"),
            ("/a/...", "/a/..."),
            ("/a/..b/c", "/a/..b/c"),
        ];
        for (raw, want) in cases {
            assert_eq!(ok(raw), want, "{raw}");
        }
    }

    #[test]
    fn encoded_dots_and_unreserved_are_decoded() {
        assert_eq!(ok("/api/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/api/%2E%2e/admin"), "/admin");
        assert_eq!(ok("/api/.%2e/admin"), "/admin");
        assert_eq!(ok("/api/%2e/x"), "/api/x");
        assert_eq!(ok("/%41%62%7e%2D%5f"), "/Ab~-_");
    }

    #[test]
    fn reserved_escapes_are_kept_uppercased() {
        assert_eq!(ok("/a%3ab"), "/a%3Ab");
        assert_eq!(ok("/a%3Fb"), "/a%3Fb");
        assert_eq!(ok("/a%25b"), "/a%25b");
        assert_eq!(ok("/%c3%a9"), "/%C3%A9");
    }

    #[test]
    fn slashes_are_merged() {
        assert_eq!(ok("//a///b//"), "/a/b/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/a//../b"), "/b");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("", PathError::NotAbsolute),
            ("api", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("http://h/a", PathError::NotAbsolute),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedBackslash),
            ("/a%5Cb", PathError::EncodedBackslash),
            ("/a\\b", PathError::Backslash),
            ("/a\0b", PathError::Nul),
            ("/a%00b", PathError::Nul),
            ("/a%0ab", PathError::Control),
            ("/a\nb", PathError::Control),
            ("/a\x7fb", PathError::Control),
            ("/é", PathError::NonAscii),
            ("/a%", PathError::InvalidEscape),
            ("/a%4", PathError::InvalidEscape),
            ("/a%zz", PathError::InvalidEscape),
            ("/a%+1", PathError::InvalidEscape),
            ("/a b", PathError::ForbiddenChar(' ')),
            ("/a#b", PathError::ForbiddenChar('#')),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn normalization_is_idempotent() {
        for raw in ["/a/%2e%2e/b//c/./d/..", "/x%3a/%41/../y/", "//../a"] {
            let once = ok(raw);
            assert_eq!(ok(&once), once, "{raw}");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(PathError::EncodedSlash.to_string(), "encoded '/' in path");
        assert_eq!(PathError::ForbiddenChar('#').to_string(), "character '#' not allowed in path");
    }

    #[test]
    fn dot_segments_with_parameters_are_refused() {
        for raw in [
            "/x/..;/admin",
            "/api/..;/admin",
            "/..;",
            "/a/..;x=1/b",
            "/a/.;x/b",
            "/a/.;/b",
            "/a/..%3B/b",
            "/a/..%3bx/b",
            "/a/%2e%2e;/b",
            "/a/.%2E;x/b",
            "/a//..;/b",
            "/a/..;?x=/b",
            "/x/;/../admin",
            "/x/;a=1/./admin",
            "/x/%3B/../admin",
        ] {
            assert_eq!(normalize_path(raw), Err(PathError::DotSegmentParameter), "{raw}");
        }
        assert_eq!(PathError::DotSegmentParameter.code(), "dot-segment-parameter");
        // Other parameters are kept, and so are segments that only start with dots.
        for (raw, want) in [
            ("/admin;", "/admin;"),
            ("/admin;x=1/", "/admin;x=1/"),
            ("/a;jsessionid=1/b", "/a;jsessionid=1/b"),
            ("/a/...;x/b", "/a/...;x/b"),
            ("/a/..x;/b", "/a/..x;/b"),
            ("/a/;/b", "/a/;/b"),
            ("/a/%3B../b", "/a/%3B../b"),
            ("/a/x;/../b", "/a/b"),
            ("/;jsessionid=1", "/;jsessionid=1"),
        ] {
            assert_eq!(ok(raw), want, "{raw}");
        }
    }

    #[test]
    fn parameters_are_removed_for_deny_matching() {
        assert_eq!(without_parameters("/admin"), None);
        for (normal, want) in [
            ("/admin;", "/admin"),
            ("/admin;x=1/", "/admin/"),
            ("/admin;x/panel;y", "/admin/panel"),
            ("/;x/admin", "/admin"),
            ("/a%3Bb/c", "/a/c"),
            ("/a;b%3Bc/d", "/a/d"),
            ("/a/;", "/a/"),
            ("/;", "/"),
        ] {
            assert_eq!(without_parameters(normal).as_deref(), Some(want), "{normal}");
        }
    }

    proptest::proptest! {
        /// Removing parameters from a normalized path gives a normalized path (no dot segment
        /// can appear, since dot segments with parameters are refused).
        #[test]
        fn paths_without_parameters_are_normal(raw in "(/(\\.|\\.\\.|a|;|;x|\\.;|\\.\\.;|%3[bB]|%2[eE])*){1,6}") {
            if let Ok(normal) = normalize_path(&raw)
                && let Some(bare) = without_parameters(&normal)
            {
                proptest::prop_assert_eq!(ok(&bare), bare.clone());
                proptest::prop_assert!(!bare.contains(';') && !bare.contains("%3B"), "{}", bare);
            }
        }
    }
}
