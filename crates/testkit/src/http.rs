//! HTTP for black-box tests: [`agent`] and [`call`] (ureq) for ordinary requests, and a
//! raw-socket client ([`http_request`], [`raw_http`]) for requests a client crate would
//! normalise or refuse: request targets such as `/chat%2Fmessage` sent byte for byte,
//! raw UTF-8 header values, half-sent heads. [`read_request`] is the other side: what
//! a test's own upstream reads off a connection.
//!
//! A transport error or a 5xx answer panics: sluice never answers 5xx, so a test that
//! sees one has found a bug, whatever it meant to check.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A port that was free a moment ago (bind :0, read it, drop the listener); panics when
/// none can be had, which only a broken machine does.
pub fn free_port() -> u16 {
    crate::servers::free_port().unwrap_or_else(|e| panic!("{e}"))
}

/// A ureq client that hands back 4xx/5xx answers as responses (tests look at them) and
/// gives up after 30 s.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// An HTTP response reduced to what the tests look at.
#[derive(Debug, Clone)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body, as text.
    pub body: String,
}

impl Resp {
    /// Reads a ureq response (a body of up to 64 MiB); panics, naming `what`, when the
    /// body cannot be read.
    pub fn read(mut r: ureq::http::Response<ureq::Body>, what: &str) -> Resp {
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_else(|e| panic!("{what}: reading body: {e}"));
        Resp {
            status,
            content_type,
            body,
        }
    }

    /// The body as JSON; panics with the status and raw body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}); status {}, body: {:?}",
                self.status, self.body
            )
        })
    }
}

/// One HTTP call to `base` + `path` on a fresh client: `method` GET or POST, an optional
/// `Authorization: Bearer <token>` and an optional JSON body (a POST without one sends
/// an empty body). Panics on a transport error or a 5xx.
pub fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let agent = agent();
    let url = format!("{base}{path}");
    let what = format!("{method} {url}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let r = match method {
        "GET" => {
            let mut req = agent.get(&url);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            req.call()
        }
        "POST" => {
            let mut req = agent.post(&url);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            match body {
                Some(b) => req
                    .header("content-type", "application/json")
                    .send(b.to_string()),
                None => req.send_empty(),
            }
        }
        other => panic!("call: unsupported method {other}"),
    };
    let r = r.unwrap_or_else(|e| panic!("{what}: transport error {e}"));
    let resp = Resp::read(r, &what);
    assert!(
        resp.status < 500,
        "{what}: server answered {} (never allowed), body {:?}",
        resp.status,
        resp.body
    );
    resp
}

/// Waits up to 10 s until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends raw bytes over a fresh TCP connection and returns the status line's
/// code and the whole response text. Write errors are ignored (a server may
/// answer and close before it has read an oversized body).
pub fn raw_http(port: u16, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let _ = s.write_all(request);
    let _ = s.flush();
    let buf = read_response(&mut s, false)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}

/// An HTTP response with its headers, as a client on the wire sees it.
#[derive(Debug, Clone)]
pub struct HttpResp {
    /// The status code.
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone), as text.
    pub body: String,
}

impl HttpResp {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, joined with ", " as one field (RFC 9110 §5.3).
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        if values.is_empty() {
            None
        } else {
            Some(values.join(", "))
        }
    }

    /// The status, headers and body, for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = format!("status {}\n", self.status);
        for (n, v) in &self.headers {
            s.push_str(&format!("  {n}: {v}\n"));
        }
        s.push_str(&format!("  body: {:?}", self.body));
        s
    }

    /// The body as JSON; panics with the whole response when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}); response:\n{}", self.describe()))
    }
}

/// Sends one HTTP/1.1 request over a fresh connection (`Connection: close`) with the
/// request target exactly as given (no URL normalisation on the client side), and
/// reads the whole response. A `Content-Length` is sent for a non-empty body and for
/// POST/PUT/PATCH.
pub fn http_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)?;
    s.flush()?;
    let buf = read_response(&mut s, method == "HEAD")?;
    parse_http_response(&buf, method == "HEAD").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "unparseable HTTP response: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        )
    })
}

/// Reads one response: until its end when the head says where that is, else until the
/// server closes or stops sending (a read timeout after some bytes ends it too).
fn read_response(s: &mut TcpStream, head_only: bool) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if http_response_complete(&buf, head_only) {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(buf)
}

fn http_response_complete(buf: &[u8], head_only: bool) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    if head_only {
        return true;
    }
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(len) => buf.len() >= end + 4 + len,
        // chunked or close-delimited: read to EOF (the request said Connection: close)
        None => {
            head.contains("transfer-encoding: chunked") && buf[end + 4..].ends_with(b"0\r\n\r\n")
        }
    }
}

fn parse_http_response(buf: &[u8], head_only: bool) -> Option<HttpResp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    for line in lines {
        let (n, v) = line.split_once(':')?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let raw = if head_only { &[][..] } else { &buf[end + 4..] };
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut rest = raw;
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&rest[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        out
    } else {
        let len = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        match len {
            Some(len) => raw.get(..len)?.to_vec(),
            None => raw.to_vec(),
        }
    };
    Some(HttpResp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request as a test's upstream read it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// The request line and header lines, as sent (without line ends).
    pub head: Vec<String>,
    /// The request target, e.g. `/v1/chat?x=1`.
    pub target: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// The body, `Content-Length` bytes of it.
    pub body: Vec<u8>,
}

impl ReceivedRequest {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the next request off a connection (for an upstream a test writes itself);
/// `None` when the peer closed or sent something unreadable.
pub fn read_request(reader: &mut impl BufRead) -> Option<ReceivedRequest> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let target = head.first()?.split(' ').nth(1).unwrap_or("/").to_string();
    let headers: Vec<(String, String)> = head[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(ReceivedRequest {
        head,
        target,
        headers,
        body,
    })
}

/// Parses an IETF `RateLimit` / `RateLimit-Policy` field (`"name";r=1;t=2, "other";q=3`)
/// into (name, parameters) items in order. Panics on a malformed field.
pub fn parse_sf_list(field: &str) -> Vec<(String, BTreeMap<String, i64>)> {
    let mut out = Vec::new();
    for item in field.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let mut parts = item.split(';');
        let name = parts.next().unwrap().trim();
        let name = name
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or_else(|| panic!("item name {name:?} is not a quoted string in {field:?}"));
        let mut params = BTreeMap::new();
        for p in parts {
            let (k, v) = p
                .trim()
                .split_once('=')
                .unwrap_or_else(|| panic!("parameter {p:?} has no value in {field:?}"));
            let v: i64 = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("parameter {p:?} is not an integer in {field:?}"));
            params.insert(k.trim().to_string(), v);
        }
        out.push((name.to_string(), params));
    }
    out
}
