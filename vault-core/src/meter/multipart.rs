//! `multipart/form-data` bodies (audio transcriptions, file uploads): the
//! proxy forwards them unread, but may need one small text field, the
//! `model`, for model allowlists.
//!
//! [`form_field`] splits the body on its boundary exactly as a server does
//! (RFC 7578: the delimiter cannot occur inside a part), so a file whose
//! content imitates a part header is never mistaken for a field
//! (docs/threat-model.md E5: never read a request differently from the
//! provider). A field that appears twice is ambiguous and reads as absent.

use memchr::memmem;

/// The boundary parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (name, value) = p.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        (!value.is_empty() && value.len() <= 70).then_some(value)
    })
}

/// Whether `content_type` is `multipart/form-data` (any parameters).
pub fn is_multipart(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or_default();
    mime.trim().eq_ignore_ascii_case("multipart/form-data")
}

/// Fields longer than this are not read (a model name is short).
const MAX_FIELD: usize = 256;

/// The value of the text field `name` in a `multipart/form-data` body, when
/// it appears exactly once, is UTF-8 and at most 256 bytes long.
pub fn form_field(content_type: &str, body: &[u8], name: &str) -> Option<String> {
    let boundary = boundary(content_type)?;
    let delimiter = format!("--{boundary}");
    let finder = memmem::Finder::new(delimiter.as_bytes());
    // The body starts with the delimiter, or a preamble then CRLF delimiter.
    let mut at = if body.starts_with(delimiter.as_bytes()) {
        0
    } else {
        let crlf = format!("\r\n{delimiter}");
        memmem::find(body, crlf.as_bytes())? + 2
    };
    let wanted = format!("name=\"{name}\"");
    let mut found: Option<String> = None;
    loop {
        let part_start = at + delimiter.len();
        let rest = body.get(part_start..)?;
        if rest.starts_with(b"--") {
            return found;
        }
        // The next delimiter, which must follow a CRLF.
        let next = find_delimiter(&finder, body, part_start)?;
        let part = body.get(part_start..next - 2)?;
        let part = part.strip_prefix(b"\r\n")?;
        let split = memmem::find(part, b"\r\n\r\n")?;
        let (headers, value) = (&part[..split], &part[split + 4..]);
        if names_field(headers, &wanted) {
            if found.is_some() || value.len() > MAX_FIELD {
                return None;
            }
            found = Some(std::str::from_utf8(value).ok()?.to_owned());
        }
        at = next;
    }
}

/// The next `CRLF--boundary` at or after `from`, as the delimiter's index.
fn find_delimiter(finder: &memmem::Finder<'_>, body: &[u8], from: usize) -> Option<usize> {
    let mut from = from;
    loop {
        let i = from + finder.find(body.get(from..)?)?;
        if i >= 2 && body.get(i - 2..i) == Some(b"\r\n") {
            return Some(i);
        }
        from = i + 1;
    }
}

/// Whether the part headers' `Content-Disposition` is `form-data` with
/// exactly the parameter `name="…"` given in `wanted`.
fn names_field(headers: &[u8], wanted: &str) -> bool {
    let Ok(headers) = std::str::from_utf8(headers) else {
        return false;
    };
    headers.split("\r\n").any(|line| {
        let Some((h, v)) = line.split_once(':') else {
            return false;
        };
        h.trim().eq_ignore_ascii_case("content-disposition")
            && v.split(';').map(str::trim).any(|p| p == wanted)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    fn body(parts: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in parts {
            b.extend_from_slice(
                format!(
                    "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn reads_a_field_once_present() {
        let b = body(&[("file", "RIFF..."), ("model", "whisper-1")]);
        assert_eq!(form_field(CT, &b, "model").as_deref(), Some("whisper-1"));
        assert_eq!(form_field(CT, &b, "language"), None);
        assert_eq!(
            form_field("multipart/form-data; boundary=\"XyZ\"", &b, "model").as_deref(),
            Some("whisper-1")
        );
    }

    #[test]
    fn hostile_duplicates_and_imitations_read_as_absent() {
        let b = body(&[("model", "a"), ("model", "b")]);
        assert_eq!(form_field(CT, &b, "model"), None);
        // A file whose content imitates a part header is still the file.
        let fake = "x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1";
        let b = body(&[("file", fake), ("model", "gpt-4o")]);
        assert_eq!(form_field(CT, &b, "model").as_deref(), Some("gpt-4o"));
        assert_eq!(form_field(CT, b"garbage", "model"), None);
        assert_eq!(form_field("application/json", &b, "model"), None);
        assert!(is_multipart("Multipart/Form-Data; boundary=a"));
        assert!(!is_multipart("application/json"));
    }
}
