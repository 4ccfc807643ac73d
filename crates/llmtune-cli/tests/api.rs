//! `llmtune api` on the tiny fixture model: models list, completions (plain and streamed),
//! usage, OpenAI-style errors, bearer auth, a client dropping its stream; continuous batching
//! (concurrent requests decode together and give what they give alone); the `web` page.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::fixtures;

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
    start_with(fx, "api", &[])
}

fn start_with(fx: &std::path::Path, cmd: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args([cmd, "--model_name_or_path"])
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
        .args(extra)
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

    // max_tokens beyond the context (512 positions) ends at the context.
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        key,
        r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":100000,"temperature":1.0,"top_p":1.0,"stop":[]}"#,
    );
    assert_eq!(st, 200, "{body}");
    let u = &json(&body)["usage"];
    assert!(u["total_tokens"].as_u64().unwrap() <= 512, "{body}");
    let long_q = "word ".repeat(600);
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        key,
        &serde_json::json!({"messages":[{"role":"user","content": long_q}]}).to_string(),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        json(&body)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{body}"
    );

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

/// The streamed text of an SSE body (content deltas of choice 0) and its finish reason.
fn sse_text(body: &str) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for e in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if e == "[DONE]" {
            continue;
        }
        let c = json(e);
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn concurrent_requests_batch_and_match_serial() {
    let Some(fx) = fixtures() else { return };
    let srv = start_with(&fx, "api", &["--max_batch", "16"]);
    let a = srv.addr.clone();
    let key = Some("sk-test");
    // Different prompt lengths, lengths of reply, stop strings, streamed or not, n = 2.
    let words = [
        "Hello",
        "What is the capital of France?",
        "a b c d e f g h i j k",
        "x",
    ];
    let reqs: Vec<String> = (0..10)
        .map(|i| {
            let q = words[i % words.len()].repeat(1 + i / 4);
            let mut r = serde_json::json!({
                "messages": [{"role": "user", "content": q}],
                "temperature": 0, "max_tokens": 12 + 5 * (i % 3),
            });
            if i % 3 == 1 {
                r["stream"] = true.into();
            }
            if i == 4 {
                r["n"] = 2.into();
            }
            if i == 7 {
                r["stop"] = "e".into();
            }
            r.to_string()
        })
        .collect();
    let answer = |body: &str, streamed: bool| -> (String, String) {
        if streamed {
            sse_text(body)
        } else {
            let v = json(body);
            let c = &v["choices"];
            if c.as_array().unwrap().len() == 2 {
                assert_eq!(c[0]["message"]["content"], c[1]["message"]["content"]);
            }
            (
                c[0]["message"]["content"].as_str().unwrap().to_string(),
                c[0]["finish_reason"].as_str().unwrap().to_string(),
            )
        }
    };
    // One at a time.
    let serial: Vec<(String, String)> = reqs
        .iter()
        .map(|r| {
            let (st, body) = http(&a, "POST", "/v1/chat/completions", key, r);
            assert_eq!(st, 200, "{body}");
            answer(&body, r.contains("\"stream\""))
        })
        .collect();
    assert!(serial.iter().any(|(t, _)| !t.is_empty()));
    let (_, before) = http(&a, "GET", "/stats", key, "");
    let before = json(&before);
    // All at once (three times over), with clients that drop their stream mid-way.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3 * reqs.len() + 6));
    let mut handles = Vec::new();
    for round in 0..3 {
        for (i, r) in reqs.iter().enumerate() {
            let (a, r, b) = (a.clone(), r.clone(), barrier.clone());
            handles.push(std::thread::spawn(move || {
                b.wait();
                let (st, body) = http(&a, "POST", "/v1/chat/completions", Some("sk-test"), &r);
                (round, i, st, body)
            }));
        }
    }
    let mut droppers = Vec::new();
    for _ in 0..4 {
        let (a, b) = (a.clone(), barrier.clone());
        droppers.push(std::thread::spawn(move || {
            b.wait();
            let mut s = TcpStream::connect(&a).unwrap();
            let long =
                r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":400,"stream":true,"temperature":1.0,"top_p":1.0}"#;
            write!(
                s,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
                long.len()
            )
            .unwrap();
            let mut buf = [0u8; 600];
            let _ = s.read(&mut buf);
        }));
    }
    // Non-streamed clients that hang up before their (long) reply is ready.
    for _ in 0..2 {
        let (a, b) = (a.clone(), barrier.clone());
        droppers.push(std::thread::spawn(move || {
            b.wait();
            let mut s = TcpStream::connect(&a).unwrap();
            let long =
                r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":3000,"temperature":1.0,"top_p":1.0}"#;
            write!(
                s,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
                long.len()
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }));
    }
    for h in handles {
        let (round, i, st, body) = h.join().unwrap();
        assert_eq!(st, 200, "{body}");
        let got = answer(&body, reqs[i].contains("\"stream\""));
        assert_eq!(
            got, serial[i],
            "request {i} (round {round}): concurrent vs alone"
        );
    }
    for d in droppers {
        d.join().unwrap();
    }
    let (_, after) = http(&a, "GET", "/stats", key, "");
    let after = json(&after);
    assert!(
        after["peak_batch"].as_u64().unwrap() > 1,
        "requests were decoded together: {before} -> {after}"
    );
    assert!(after["peak_batch"].as_u64().unwrap() <= 16, "{after}");
    // Batched steps: fewer steps than tokens.
    let steps = after["steps"].as_u64().unwrap() - before["steps"].as_u64().unwrap();
    let tokens = after["tokens"].as_u64().unwrap() - before["tokens"].as_u64().unwrap();
    assert!(steps < tokens, "steps {steps} tokens {tokens}");
    // The dropped streams and hung-up requests were cancelled, and nothing stays running.
    let mut idle = after.clone();
    for _ in 0..100 {
        if idle["running"] == 0 && idle["cancelled"].as_u64().unwrap() >= 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        idle = json(&http(&a, "GET", "/stats", key, "").1);
    }
    assert_eq!(idle["running"], 0, "{idle}");
    assert!(idle["cancelled"].as_u64().unwrap() >= 6, "{idle}");
}

#[test]
fn web_serves_the_chat_page() {
    let Some(fx) = fixtures() else { return };
    let srv = start_with(&fx, "web", &[]);
    let (st, body) = http(&srv.addr, "GET", "/", None, "");
    assert_eq!(st, 200);
    for needle in [
        "<title>llmtune chat</title>",
        "/v1/chat/completions",
        "id=\"max_new_tokens\"",
        "id=\"top_p\"",
        "id=\"temperature\"",
        "Clear history",
    ] {
        assert!(body.contains(needle), "page lacks {needle}");
    }
    // The API is there too; `api` alone has no page.
    let (st, _) = http(&srv.addr, "GET", "/v1/models", Some("sk-test"), "");
    assert_eq!(st, 200);
    let api = start(&fx);
    let (st, _) = http(&api.addr, "GET", "/", None, "");
    assert_eq!(st, 404);
}
