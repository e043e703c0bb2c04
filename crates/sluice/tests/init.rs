//! `sluice init`: each starter config passes check-config and runs as written (with
//! only the listen addresses moved to free ports through the environment), answering
//! one decision in its mode; `sluice health` says whether it runs; `--version` names
//! the version and the commit.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ScratchDir, bin, free_port, http_request, scratch_dir};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sluice serve` on `file`, with `listen` (and the admin listener) moved by env.
fn serve(file: &std::path::Path, port: u16, admin_port: u16) -> Running {
    let child = Command::new(bin().path())
        .args(["serve", "--config"])
        .arg(file)
        .env("SLUICE_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLUICE_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice serve");
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sluice did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    running
}

/// Runs `sluice init <mode>` into a scratch directory (removed when the returned guard
/// drops) and checks the file it wrote; returns the guard and the file.
fn init(mode: &[&str]) -> (ScratchDir, std::path::PathBuf) {
    let dir = scratch_dir("init");
    let file = dir.join("sluice.yaml");
    let mut args = vec!["init"];
    args.extend_from_slice(mode);
    let out = Command::new(bin().path())
        .args(&args)
        .arg("--output")
        .arg(&file)
        .output()
        .expect("run sluice init");
    assert!(
        out.status.success(),
        "{mode:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = Command::new(bin().path())
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{mode:?}: {stdout}");
    assert!(
        !stdout.contains("warning"),
        "{mode:?} starts without warnings: {stdout}"
    );
    (dir, file)
}

fn health(url: &str) -> bool {
    Command::new(bin().path())
        .args(["health", "--url", url])
        .status()
        .expect("run sluice health")
        .success()
}

#[test]
fn the_api_starter_decides() {
    let (_dir, file) = init(&["api"]);
    let (port, admin) = (free_port(), free_port());
    let _server = serve(&file, port, admin);
    let r = http_request(
        port,
        "POST",
        "/v1/check",
        &[("Content-Type", "application/json")],
        br#"{"checks":[{"limit":"per_user","key":"user:42"}]}"#,
    )
    .expect("answer");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.json()["allowed"], true);
    assert!(health(&format!("http://127.0.0.1:{port}/healthz")));
}

#[test]
fn the_forward_auth_starter_decides() {
    let (_dir, file) = init(&["forward-auth"]);
    let (port, admin) = (free_port(), free_port());
    let _server = serve(&file, port, admin);
    let headers = [
        ("X-Original-Method", "POST"),
        ("X-Original-URI", "/chat/message"),
    ];
    for _ in 0..5 {
        let r = http_request(port, "GET", "/v1/forward-auth", &headers, b"").expect("answer");
        assert_eq!(r.status, 200, "{}", r.describe());
    }
    let r = http_request(port, "GET", "/v1/forward-auth", &headers, b"").expect("answer");
    assert_eq!(
        r.status,
        403,
        "the 6th in a minute, with nginx's status: {}",
        r.describe()
    );
}

#[test]
fn the_proxy_starter_forwards_and_keeps_its_endpoints_private() {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_url = format!("http://127.0.0.1:{}", upstream.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for stream in upstream.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let mut length = 0;
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut writer = stream;
            let _ = writer.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nfrom app\n",
            );
        }
    });
    let (_dir, file) = init(&["proxy", "--upstream", &upstream_url]);
    let (port, admin) = (free_port(), free_port());
    let _server = serve(&file, port, admin);
    let r =
        http_request(port, "POST", "/chat/message", &[("X-User-Id", "42")], b"hi").expect("answer");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body, "from app\n");
    assert!(r.header("ratelimit").is_some(), "{}", r.describe());
    // /healthz is the app's on the public port, sluice's on the admin port.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !health(&format!("http://127.0.0.1:{admin}/healthz")) {
        assert!(
            Instant::now() < deadline,
            "the admin listener answers /healthz"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(bin().path())
        .arg("--version")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!("sluice {} (", env!("CARGO_PKG_VERSION")))
            && text.trim_end().ends_with(')'),
        "{text}"
    );
    assert!(
        !health(&format!("http://127.0.0.1:{}/healthz", free_port())),
        "nothing runs there"
    );
}
