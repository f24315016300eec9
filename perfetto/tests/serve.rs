//! The trace server answered by a real HTTP client (curl), the way the Perfetto UI talks to it.

use std::path::Path;
use std::process::Command;

use rrr_perfetto::{ServeError, TraceServer};

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Runs curl with `args`, returning the status, headers and body of the answer.
fn curl(dir: &Path, args: &[&str]) -> Answer {
    let head = dir.join("head");
    let body = dir.join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .output()
        .expect("curl is needed for the server test");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&head).unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
    Answer {
        status: status.parse().unwrap(),
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

#[test]
fn the_server_answers_the_ui_with_cors_a_404_status_and_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("my run.pftrace");
    let contents: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&trace, &contents).unwrap();
    let server = TraceServer::bind(&trace, 0).unwrap();
    let port = server.local_addr().port();
    assert_eq!(
        server.ui_link(),
        format!("https://ui.perfetto.dev/#!/?url=http://127.0.0.1:{port}/my%20run.pftrace")
    );
    let url = server.trace_url();
    let base = format!("http://127.0.0.1:{port}");
    std::thread::spawn(move || server.run());
    let origin = "Origin: https://ui.perfetto.dev";

    // The UI's probe for a trace_processor.
    let status = curl(
        dir.path(),
        &["-X", "POST", "-H", origin, &format!("{base}/status")],
    );
    assert_eq!(status.status, 404);
    assert_eq!(
        status.header("access-control-allow-origin"),
        Some("https://ui.perfetto.dev")
    );

    // A CORS preflight, with Chrome's private-network request header.
    let pre = curl(
        dir.path(),
        &[
            "-X",
            "OPTIONS",
            "-H",
            origin,
            "-H",
            "Access-Control-Request-Method: GET",
            "-H",
            "Access-Control-Request-Headers: range",
            "-H",
            "Access-Control-Request-Private-Network: true",
            &url,
        ],
    );
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://ui.perfetto.dev")
    );
    assert!(pre
        .header("access-control-allow-methods")
        .unwrap()
        .contains("GET"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("range"));
    assert_eq!(
        pre.header("access-control-allow-private-network"),
        Some("true")
    );

    // The trace itself, byte for byte.
    let got = curl(dir.path(), &["-H", origin, &url]);
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("access-control-allow-origin"),
        Some("https://ui.perfetto.dev")
    );
    assert_eq!(
        got.header("content-length"),
        Some(contents.len().to_string().as_str())
    );
    assert!(
        got.body == contents,
        "the served bytes differ from the file"
    );

    // Nothing else is served: not another file, not a path out of the directory.
    for path in ["/other.pftrace", "/../my%20run.pftrace", "/"] {
        let other = curl(dir.path(), &["--path-as-is", &format!("{base}{path}")]);
        assert_eq!(other.status, 404, "{path}");
    }
}

#[test]
fn a_port_in_use_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.pftrace");
    std::fs::write(&trace, b"x").unwrap();
    let first = TraceServer::bind(&trace, 0).unwrap();
    let port = first.local_addr().port();
    match TraceServer::bind(&trace, port) {
        Err(e @ ServeError::PortInUse { .. }) => {
            assert!(e.to_string().contains(&port.to_string()))
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second server bound a port in use"),
    }
}

#[test]
fn a_missing_trace_is_refused_before_listening() {
    let err = TraceServer::bind(Path::new("/nonexistent/t.pftrace"), 0)
        .err()
        .expect("a missing file must be refused");
    assert!(matches!(err, ServeError::Trace { .. }), "{err}");
}
