//! `mlxd serve` as a process: the port is bound before the model loads, half-sent headers are
//! cut off by `--read-timeout`, and shutdown drains running requests, stops admitting, and
//! gives up on a second signal or after `--shutdown-timeout`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::repo_model;
use serde_json::json;

/// A running `mlxd serve` on a free port (its default log filter); killed when dropped.
struct Server {
    child: Child,
    port: u16,
    /// Every line it logged after it was ready.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mlxd"))
            .args(["serve", "--kv-memory", "64MiB", "--port", &port.to_string(), "--model"])
            .arg(repo_model())
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = lines.next().expect("mlxd exited before it was ready").expect("line");
            if line.contains("ready: listening") {
                break;
            }
            assert!(Instant::now() < deadline, "not ready within 60 s");
        }
        // Keep draining stderr so the process never blocks on a full pipe.
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .for_each(|l| kept.lock().expect("log").push(l))
        });
        Self { child, port, log }
    }

    /// The lines logged so far that contain `needle`.
    fn logged(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().expect("log");
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit; its exit code and how long that took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code(), start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mlxd did not exit within {limit:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Opens `count` streaming completions of `tokens` tokens each and returns their responses.
async fn open_streams(s: &Server, count: usize, tokens: u32) -> Vec<reqwest::Response> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let body = json!({"prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": true, "stream": true});
        let mut resp = client
            .post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        resp.chunk().await.expect("first chunk");
        out.push(resp);
    }
    out
}

#[test]
fn an_address_in_use_fails_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mlxd"))
        .args(["serve", "--port", &port, "--model"])
        .arg(repo_model())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(
        !stderr.contains("ready: listening"),
        "failed before loading the model: {stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn half_sent_headers_are_cut_off_by_the_read_timeout() {
    let s = Server::start(&["--read-timeout", "0.5"]);
    let mut tcp = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").expect("write");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_signal_drains_running_streams_and_refuses_new_ones() {
    let mut s = Server::start(&["--shutdown-timeout", "60"]);
    let mut streams = open_streams(&s, 2, 120).await;
    s.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New work is refused (503 on an open connection, or the listener is gone).
    let late = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await;
    if let Ok(resp) = late {
        assert_eq!(resp.status(), 503);
    }
    for resp in &mut streams {
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.expect("chunk") {
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("[DONE]"), "the running stream finished: {text}");
    }
    let (code, _) = s.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_or_the_drain_timeout_exits_at_once() {
    for (second_signal, timeout) in [(true, "60"), (false, "0.5")] {
        let mut s = Server::start(&["--shutdown-timeout", timeout, "--max-seqs", "1"]);
        // Queued work (one sequence at a time) that takes far longer than the test waits.
        let _streams = open_streams(&s, 1, 400).await;
        let queued: Vec<_> = (0..12)
            .map(|_| {
                let request = reqwest::Client::new()
                    .post(s.url("/v1/completions"))
                    .json(&json!({"prompt": "Once", "max_tokens": 400, "ignore_eos": true, "stream": true}));
                tokio::spawn(async move {
                    if let Ok(mut resp) = request.send().await {
                        while let Ok(Some(_)) = resp.chunk().await {}
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.signal("TERM");
        if second_signal {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.signal("INT");
        }
        let (code, took) = s.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(130), "second signal {second_signal}");
        assert!(took < Duration::from_secs(5), "exited after {took:?}");
        queued.into_iter().for_each(|t| t.abort());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_a_log_line_and_probes_stay_quiet() {
    let s = Server::start(&[]);
    let client = reqwest::Client::new();
    let ok = json!({"prompt": "Once upon a time", "max_tokens": 2});
    let sent = client
        .post(s.url("/v1/completions"))
        .json(&ok)
        .send()
        .await
        .expect("request");
    assert_eq!(sent.status(), 200);
    let bad = client
        .post(s.url("/api/generate"))
        .body("{")
        .send()
        .await
        .expect("request");
    assert_eq!(bad.status(), 400);
    let health = reqwest::get(s.url("/health")).await.expect("health");
    assert_eq!(health.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.logged("path=/api/generate").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = |path: &str| s.logged(&format!("path={path} ")).join("\n");
    assert!(line("/v1/completions").contains("method=POST") && line("/v1/completions").contains("status=200"));
    assert!(
        line("/api/generate").contains("status=400"),
        "{}",
        line("/api/generate")
    );
    assert!(
        line("/health").is_empty(),
        "a probe is logged at debug only: {}",
        line("/health")
    );
}
