//! The dashboard in a real browser (issue 18): Debian's headless Chromium loads
//! `/v1/admin/dashboard` from the real binary while a load generator hammers
//! `/v1/check`, and the page it rendered (`--dump-dom`, after its script has polled) must
//! show drawn charts and the busiest key at the top of the top-keys tables; a wrong
//! token must be refused. A screenshot is saved and its path printed.
//!
//! Needs `chromium` (Debian's package); `scripts/test` installs it. When it is missing
//! the test fails and says so: it does not skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TOKEN: &str = ADMIN_TOKEN;
const BUSY: &str = "busy-key";

const CONFIG: &str = "\
admin: {token: secret-token-for-tests}
storage: {backend: memory, max_keys: 100000}
limits:
  api: {rate: 200/second}
  quiet: {rate: 10/minute}
";

fn chromium() -> PathBuf {
    for candidate in ["chromium", "/usr/bin/chromium", "chromium-browser"] {
        let ok = Command::new(candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "chromium is not installed; this browser test needs it. Run `scripts/test`, which \
         installs Debian's chromium, or `apt-get install chromium`."
    );
}

/// Runs headless Chromium on `url` with `args` (a fresh profile in `dir`), waiting at
/// most 90 s; its stdout.
fn run_chromium(dir: &Path, url: &str, args: &[&str]) -> String {
    let profile = scratch_dir("chromium-profile");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            // Virtual time runs the page's timers (it polls every 2 s) without waiting
            // for them; network fetches still complete for real.
            "--virtual-time-budget=7000",
            "--window-size=1300,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("chromium output");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of attribute `name` in the first tag after `from` in `dom` that has it.
fn attribute_after<'a>(dom: &'a str, from: usize, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = dom[from..].find(&needle)? + from + needle.len();
    let end = dom[start..].find('"')? + start;
    Some(&dom[start..end])
}

/// The first `data-key` of the table with `id`.
fn first_row_key<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let end = dom[at..].find("</table>")? + at;
    attribute_after(&dom[..end], at, "data-key")
}

/// `data-total` of the chart path with `class` inside the chart of `limit`.
fn chart_total(dom: &str, limit: &str, class: &str) -> Option<u64> {
    let chart = dom.find(&format!("data-limit=\"{limit}\""))?;
    let path = dom[chart..].find(&format!("class=\"{class}\""))? + chart;
    attribute_after(dom, path, "data-total")?.parse().ok()
}

#[test]
fn dashboard_draws_live_data_in_headless_chromium_and_refuses_a_wrong_token() {
    let s = Server::start(CONFIG);
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // The load: BUSY three times in every five checks of `api` (so it spends the
        // most and, past 200/second, is denied the most), the rest spread over 50 keys
        // (each of which stays the lesser spender below 25,000 checks a second).
        for thread in 0..2u64 {
            let (s, stop, sent) = (&s, &stop, &sent);
            scope.spawn(move || {
                let mut i = thread;
                while !stop.load(Ordering::Relaxed) {
                    let key = if i % 5 < 3 {
                        BUSY.to_string()
                    } else {
                        format!("k{}", i % 50)
                    };
                    let r = s.post_json(
                        "/v1/check",
                        &json!({"checks": [{"limit": "api", "key": key}]}),
                    );
                    assert!(r.status == 200 || r.status == 429, "{}", r.body);
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        let stop_load = || stop.store(true, Ordering::Relaxed);
        while sent.load(Ordering::Relaxed) < 500 {
            std::thread::sleep(Duration::from_millis(20));
        }

        let dir = scratch_dir("dashboard-browser");
        let page = s.url("/v1/admin/dashboard");
        let dom = run_chromium(&dir, &format!("{page}#token={TOKEN}"), &["--dump-dom"]);
        let shot = dir.join("dashboard.png");
        let shot_arg = format!("--screenshot={}", shot.display());
        run_chromium(&dir, &format!("{page}#token={TOKEN}"), &[&shot_arg]);
        let wrong = run_chromium(
            &dir,
            &format!("{page}#token=not-the-admin-token-at-all"),
            &["--dump-dom"],
        );
        let no_token = run_chromium(&dir, &page, &["--dump-dom"]);
        stop_load();

        let keep = std::env::temp_dir().join("sluice-dashboard-browser");
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::write(keep.join("dashboard.html"), &dom);
        let saved = keep.join("dashboard.png");
        let copied = std::fs::copy(&shot, &saved);
        println!(
            "dashboard screenshot: {} (DOM: {})",
            saved.display(),
            keep.join("dashboard.html").display()
        );

        // The page polled with the token and drew what it got.
        assert!(dom.contains("data-state=\"live\""), "not live:\n{dom}");
        assert!(dom.contains("<main id=\"board\">"), "board hidden:\n{dom}");
        let decisions = chart_total(&dom, "api", "series-decisions");
        assert!(
            decisions.is_some_and(|n| n >= 500),
            "decisions drawn: {decisions:?}\n{dom}"
        );
        let denied = chart_total(&dom, "api", "series-denied");
        assert!(denied.is_some_and(|n| n > 0), "denials drawn: {denied:?}");
        let path_start = dom.find("class=\"series-decisions\"").unwrap_or(0);
        let d = attribute_after(&dom, path_start, "d").unwrap_or("");
        assert_eq!(
            d.matches('L').count(),
            59,
            "60 points in the decisions path: {d}"
        );
        assert_eq!(chart_total(&dom, "quiet", "series-decisions"), Some(0));
        // The busiest key heads both tables of `api`.
        assert_eq!(first_row_key(&dom, "top-spend-api"), Some(BUSY), "{dom}");
        assert_eq!(first_row_key(&dom, "top-denied-api"), Some(BUSY), "{dom}");
        // The token was taken out of the address bar.
        assert!(!dom.contains(TOKEN), "the token is in the page");
        // The screenshot exists and is a PNG of some size.
        let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 20_000,
            "{} bytes",
            png.len()
        );
        assert!(copied.is_ok(), "copy to {}", saved.display());

        // A wrong token: refused, and nothing of the data shows.
        assert!(
            wrong.contains("data-state=\"refused\""),
            "wrong token not refused:\n{wrong}"
        );
        assert!(wrong.contains("refused (401)"), "{wrong}");
        assert!(wrong.contains("does not match admin.token"), "{wrong}");
        assert!(wrong.contains("<main id=\"board\" hidden"), "{wrong}");
        assert!(
            !wrong.contains(BUSY) && !wrong.contains("series-decisions"),
            "{wrong}"
        );
        // No token: the form, and nothing else.
        assert!(no_token.contains("data-state=\"login\""), "{no_token}");
        assert!(!no_token.contains(BUSY));
    });
    let r = s.call(
        "GET",
        "/v1/admin/dashboard/data",
        Some("not-the-admin-token-at-all"),
        None,
    );
    assert_eq!(r.status, 401, "{}", r.body);
}
