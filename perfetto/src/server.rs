//! The trace server: plain HTTP on 127.0.0.1, answering the way the Perfetto UI fetches a trace.
//!
//! The UI (https://ui.perfetto.dev) may fetch only from `http://127.0.0.1:9001` (its
//! content-security policy). It first probes `POST /status`, where a 200 would make it take us for
//! a trace_processor, so that gets a 404. The trace itself is `GET /<file name>`, cross-origin,
//! hence `Access-Control-Allow-Origin` on every answer and a preflight (`OPTIONS`) answer that
//! also grants Chrome's private-network access from a public origin to the loopback address.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ServeError;

/// The only port the UI's content-security policy lets it fetch from.
pub const DEFAULT_PORT: u16 = 9001;

const UI_ORIGIN: &str = "https://ui.perfetto.dev";

/// Requests larger than this (request line plus headers) are refused; the UI sends a few hundred
/// bytes.
const MAX_HEAD: usize = 16 * 1024;

/// The link that opens the trace `file_name` served on `port` in the Perfetto UI.
pub fn ui_link(port: u16, file_name: &str) -> String {
    format!(
        "{UI_ORIGIN}/#!/?url=http://127.0.0.1:{port}/{}",
        percent_encode(file_name)
    )
}

/// Serves one trace file on 127.0.0.1.
pub struct TraceServer {
    listener: TcpListener,
    path: PathBuf,
    file_name: String,
}

impl TraceServer {
    /// Listens on 127.0.0.1:`port` (0 picks a free port) for `trace`. Loopback only: a trace holds
    /// guest memory contents and is not for the network.
    pub fn bind(trace: &Path, port: u16) -> Result<Self, ServeError> {
        File::open(trace).map_err(|source| ServeError::Trace {
            path: trace.to_owned(),
            source,
        })?;
        let file_name = trace
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ServeError::NoFileName(trace.to_owned()))?
            .to_owned();
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|source| {
                match source.kind() {
                    io::ErrorKind::AddrInUse => ServeError::PortInUse { port },
                    _ => ServeError::Bind { port, source },
                }
            })?;
        Ok(TraceServer {
            listener,
            path: trace.to_owned(),
            file_name,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The trace's own URL.
    pub fn trace_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.local_addr().port(),
            percent_encode(&self.file_name)
        )
    }

    /// The link to open in a browser.
    pub fn ui_link(&self) -> String {
        ui_link(self.local_addr().port(), &self.file_name)
    }

    /// Answers requests until the process ends, one thread per connection so a stalled browser
    /// tab does not block another.
    pub fn run(self) -> Result<(), ServeError> {
        loop {
            self.accept_one()?;
        }
    }

    /// Accepts one connection and answers it on its own thread.
    pub fn accept_one(&self) -> Result<(), ServeError> {
        let (stream, peer) = self.listener.accept().map_err(ServeError::Accept)?;
        let path = self.path.clone();
        let name = self.file_name.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(stream, &path, &name) {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
        Ok(())
    }
}

/// One request, one answer, then the connection closes (`Connection: close`): the UI makes a
/// handful of requests, and keep-alive would only add state.
fn handle(stream: TcpStream, trace: &Path, file_name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let Some(request) = read_head(&mut reader)? else {
        return Ok(());
    };
    let mut out = io::BufWriter::new(stream);
    let wanted = format!("/{file_name}");
    let target = percent_decode(request.path.split('?').next().unwrap_or(""));
    tracing::debug!("{} {}", request.method, request.path);
    match request.method.as_str() {
        "OPTIONS" => {
            let allow_headers = request
                .header("access-control-request-headers")
                .unwrap_or("*")
                .to_owned();
            respond(
                &mut out,
                "204 No Content",
                &[
                    ("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", &allow_headers),
                    ("Access-Control-Allow-Private-Network", "true"),
                    ("Access-Control-Max-Age", "600"),
                    ("Content-Length", "0"),
                ],
            )?;
        }
        "GET" | "HEAD" if target == wanted => {
            let mut file = File::open(trace)?;
            let len = file.metadata()?.len().to_string();
            respond(
                &mut out,
                "200 OK",
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", &len),
                    ("Cache-Control", "no-cache"),
                ],
            )?;
            if request.method == "GET" {
                io::copy(&mut file, &mut out)?;
            }
        }
        // `POST /status` lands here: a 404 tells the UI there is no trace_processor behind us.
        "GET" | "HEAD" | "POST" => not_found(&mut out)?,
        _ => respond(
            &mut out,
            "405 Method Not Allowed",
            &[
                ("Allow", "GET, HEAD, POST, OPTIONS"),
                ("Content-Length", "0"),
            ],
        )?,
    }
    out.flush()
}

fn not_found(out: &mut impl Write) -> io::Result<()> {
    let body = "not found\n";
    let len = body.len().to_string();
    respond(
        out,
        "404 Not Found",
        &[("Content-Type", "text/plain"), ("Content-Length", &len)],
    )?;
    out.write_all(body.as_bytes())
}

fn respond(out: &mut impl Write, status: &str, headers: &[(&str, &str)]) -> io::Result<()> {
    write!(out, "HTTP/1.1 {status}\r\n")?;
    write!(out, "Access-Control-Allow-Origin: {UI_ORIGIN}\r\n")?;
    write!(out, "Vary: Origin\r\nConnection: close\r\n")?;
    for (k, v) in headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    write!(out, "\r\n")
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The request line and headers; the body (a POST's) is never needed. `None` when the peer
/// closed before sending a request line.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader.take(MAX_HEAD as u64).read_line(&mut line)?;
        head.push(n);
        if head.iter().sum::<usize>() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request too large",
            ));
        }
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            break;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let mut first = lines
        .first()
        .map(|l| l.split_whitespace())
        .into_iter()
        .flatten();
    let (Some(method), Some(path)) = (first.next(), first.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
    }))
}

/// Escapes what may not stand in a URL path segment (the UI takes the trace URL as a query
/// parameter, so `&`, `#`, `?` and `%` must be escaped too).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_url() {
        for name in ["trace.pftrace", "a b&c#d%e.pftrace", "ünï.pftrace"] {
            assert_eq!(percent_decode(&percent_encode(name)), name);
        }
        assert_eq!(
            ui_link(9001, "x y.pftrace"),
            "https://ui.perfetto.dev/#!/?url=http://127.0.0.1:9001/x%20y.pftrace"
        );
    }
}
