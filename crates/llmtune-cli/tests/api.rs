//! `llmtune api` on the tiny fixture model: models list, completions (plain and streamed),
//! usage, OpenAI-style errors, bearer auth, a client dropping its stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(fx: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args(["api", "--model_name_or_path"])
        .arg(fx.join("llama"))
        .args([
            "--template",
            "chatml",
            "--port",
            "0",
            "--api_key",
            "sk-test",
            "--model_id",
            "tiny",
        ])
        .args(["--max_new_tokens", "8"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "server exited before listening"
        );
        if let Some(rest) = line.split("on http://").nth(1) {
            break rest.trim().trim_end_matches("/v1").to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Server { child, addr }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status: u16 = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn openai_chat_completions() {
    let Some(fx) = fixtures() else { return };
    let srv = start(&fx);
    let a = srv.addr.as_str();
    let key = Some("sk-test");

    let (st, body) = http(a, "GET", "/v1/models", key, "");
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["data"][0]["id"], "tiny");

    let req = r#"{"model":"tiny","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"temperature":0,"max_tokens":6,"n":2}"#;
    let (st, body) = http(a, "POST", "/v1/chat/completions", key, req);
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    // Greedy: both choices are the same text.
    assert_eq!(
        choices[0]["message"]["content"],
        choices[1]["message"]["content"]
    );
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 3);
    assert!(completion > 0 && completion <= 12, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );

    // Streamed: role delta, content deltas that add up to the plain reply, finish, [DONE].
    let sreq = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"temperature":0,"max_tokens":6,"stream":true}"#;
    let (st, body) = http(a, "POST", "/v1/chat/completions", key, sreq);
    assert_eq!(st, 200, "{body}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]", "{body}");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| json(e)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, choices[0]["message"]["content"].as_str().unwrap());
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    // Errors in OpenAI's shape.
    let (st, body) = http(a, "POST", "/v1/chat/completions", None, req);
    assert_eq!(st, 401);
    assert_eq!(json(&body)["error"]["code"], "invalid_api_key");
    let (st, body) = http(a, "POST", "/v1/chat/completions", key, r#"{"messages":[]}"#);
    assert_eq!(st, 400);
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("user message"));
    let (st, body) = http(a, "POST", "/v1/chat/completions", key, "{not json");
    assert_eq!(st, 400, "{body}");
    assert_eq!(json(&body)["error"]["type"], "invalid_request_error");
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        key,
        r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(st, 404);
    assert_eq!(json(&body)["error"]["code"], "model_not_found");
    let (st, _) = http(a, "GET", "/v2/nothing", key, "");
    assert_eq!(st, 404);
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        key,
        r#"{"messages":[{"role":"user","content":"x"}],"temperature":7}"#,
    );
    assert_eq!(st, 400);
    assert_eq!(json(&body)["error"]["param"], "temperature");

    // A client that drops its stream mid-way does not break the server.
    {
        let mut s = TcpStream::connect(a).unwrap();
        let long =
            r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":200,"stream":true}"#;
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    }
    let (st, body) = http(a, "GET", "/v1/models", key, "");
    assert_eq!(st, 200, "{body}");
}
