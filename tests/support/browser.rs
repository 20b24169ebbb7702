//! A headless Chromium driven over the DevTools protocol (CDP), for the console tests: the
//! browser is started on a fresh profile with `--remote-debugging-port=0`, the port is read
//! from `DevToolsActivePort`, and one page target is spoken to over a small hand-written
//! WebSocket client (text frames, masked as a client must; no TLS, no extensions). Every wait
//! has a deadline; the browser's whole process group is killed when the handle goes away.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{eventually, get, send, within};

/// The browser the tests use; `SHARDGATE_CHROMIUM` names another binary.
fn chromium() -> PathBuf {
    std::env::var_os("SHARDGATE_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), Into::into)
}

/// How long one CDP command may take to be answered.
const COMMAND_DEADLINE: Duration = Duration::from_secs(20);
/// How long a polled page condition may take to come true.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(20);

/// A running headless Chromium.
pub struct Browser {
    child: tokio::process::Child,
    /// The process group (= the browser's pid): its renderers and helpers are in it too.
    group: Option<u32>,
    port: u16,
    /// `ws://…/devtools/browser/<id>`: where `Browser.close` is sent.
    browser_ws: String,
    _profile: TempDir,
}

impl Browser {
    /// Starts Chromium headless on a fresh profile. Fails the test, saying how to install it,
    /// when the binary is missing: a console test never passes without a browser.
    pub async fn launch(width: u32, height: u32) -> Browser {
        let bin = chromium();
        assert!(
            bin.exists(),
            "{} not found: the console tests need Chromium (`make deps` installs the Debian package `chromium`, or set SHARDGATE_CHROMIUM)",
            bin.display()
        );
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
        let child = cmd.spawn().expect("start chromium");
        let group = child.id();
        let mut browser = Browser {
            child,
            group,
            port: 0,
            browser_ws: String::new(),
            _profile: profile,
        };
        let file = browser._profile.path().join("DevToolsActivePort");
        let (port, path) = eventually("chromium to write DevToolsActivePort", || {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            async move {
                let mut lines = text.lines();
                let port: u16 = lines.next()?.trim().parse().ok()?;
                let path = lines.next()?.trim().to_owned();
                Some((port, path))
            }
        })
        .await;
        browser.port = port;
        browser.browser_ws = format!("ws://127.0.0.1:{port}{path}");
        browser
    }

    /// The page Chromium opened (`about:blank`), connected.
    pub async fn page(&self) -> Page {
        let addr = format!("127.0.0.1:{}", self.port)
            .parse()
            .expect("an address");
        let list = send(addr, get("/json/list", &[])).await.json();
        let ws = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in /json/list: {list}"))
            .to_owned();
        let mut page = Page {
            ws: WebSocket::connect(&ws).await,
            next_id: 0,
            exceptions: Vec::new(),
        };
        page.call("Runtime.enable", json!({})).await;
        page.call("Page.enable", json!({})).await;
        page
    }

    /// Closes the browser and waits for it; kills its process group if it does not end.
    pub async fn close(mut self) {
        let closed = async {
            let mut ws = WebSocket::connect(&self.browser_ws).await;
            ws.send_text(&json!({"id": 1, "method": "Browser.close"}).to_string())
                .await;
            let _ = self.child.wait().await;
        };
        if tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .is_ok()
        {
            self.group = None;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A panicking test still leaves no Chromium behind: the whole group we started goes.
        if let Some(group) = self.group.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// One page target.
pub struct Page {
    ws: WebSocket,
    next_id: u64,
    /// Uncaught exceptions the page threw, as Chromium reported them.
    pub exceptions: Vec<String>,
}

impl Page {
    /// Sends a CDP command and returns its result; fails the test on a protocol error.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        within(COMMAND_DEADLINE, method, async {
            self.ws.send_text(&msg).await;
            loop {
                let text = self.ws.read_text().await;
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("CDP sent no JSON ({e}): {text}"));
                if v["method"] == "Runtime.exceptionThrown" {
                    let d = &v["params"]["exceptionDetails"];
                    self.exceptions.push(format!(
                        "{} {}",
                        d["text"].as_str().unwrap_or(""),
                        d["exception"]["description"].as_str().unwrap_or("")
                    ));
                }
                if v["id"] == id {
                    if let Some(e) = v.get("error") {
                        panic!("{method} failed: {e}");
                    }
                    return v["result"].clone();
                }
            }
        })
        .await
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value as JSON, or the
    /// exception it threw.
    pub async fn eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(d) => Err(format!(
                "{} {}",
                d["text"].as_str().unwrap_or(""),
                d["exception"]["description"].as_str().unwrap_or("")
            )),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Like `eval`, failing the test on an exception.
    pub async fn value(&mut self, expr: &str) -> Value {
        match self.eval(expr).await {
            Ok(v) => v,
            Err(e) => panic!("`{expr}` threw: {e}"),
        }
    }

    /// Polls `expr` until it is neither `null`, `undefined` nor `false`, and returns it.
    pub async fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_DEADLINE;
        loop {
            let v = self.eval(expr).await.unwrap_or(Value::Null);
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {PAGE_DEADLINE:?} waiting for {what} (`{expr}`); page exceptions: {:?}",
                self.exceptions
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens `url` and waits for the document to be loaded.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            &format!("{url} to load"),
            "document.readyState === 'complete' && location.href !== 'about:blank'",
        )
        .await;
    }

    /// The centre of the element `selector` in viewport coordinates, scrolled into view.
    async fn centre(&mut self, selector: &str) -> (f64, f64) {
        let sel = serde_json::to_string(selector).expect("a JSON string");
        let v = self
            .wait_for(
                &format!("{selector} to be shown"),
                &format!(
                    "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                     e.scrollIntoView({{block: 'center', inline: 'center'}}); \
                     const r = e.getBoundingClientRect(); \
                     return r.width > 0 && r.height > 0 ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()"
                ),
            )
            .await;
        (v[0].as_f64().unwrap_or(0.0), v[1].as_f64().unwrap_or(0.0))
    }

    /// Clicks the element with real mouse events at its centre (so it must be visible and
    /// not covered).
    pub async fn click(&mut self, selector: &str) {
        let (x, y) = self.centre(selector).await;
        self.mouse("mouseMoved", x, y).await;
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    pub async fn mouse(&mut self, kind: &str, x: f64, y: f64) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": kind, "x": x, "y": y}),
        )
        .await;
    }

    /// Clicks into the input `selector` and types `text`, as a keyboard would.
    pub async fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector).await;
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Writes a PNG of the whole page (`width` wide) to `path`.
    pub async fn screenshot(&mut self, path: &Path, width: u32) {
        let height = self
            .value("Math.ceil(document.documentElement.scrollHeight)")
            .await
            .as_u64()
            .unwrap_or(1000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let data = r["data"].as_str().expect("screenshot data");
        let png = base64_decode(data).expect("base64 screenshot");
        std::fs::write(path, png).expect("write the screenshot");
    }
}

/// Standard base64 (with padding), as CDP sends binary data.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in chunk {
            n = (n << 6) | if c == b'=' { 0 } else { value(c)? };
        }
        n <<= 6 * (4 - chunk.len() as u32);
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}

/// A client WebSocket over plain TCP: enough of RFC 6455 for CDP.
struct WebSocket {
    stream: TcpStream,
    /// Bytes read past what has been handed out.
    buf: Vec<u8>,
}

impl WebSocket {
    async fn connect(url: &str) -> WebSocket {
        let rest = url
            .strip_prefix("ws://")
            .unwrap_or_else(|| panic!("not a ws:// URL: {url}"));
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        within(COMMAND_DEADLINE, "the DevTools WebSocket", async {
            let mut stream = TcpStream::connect(host).await.expect("connect to DevTools");
            // The key only has to be 16 bytes in base64; the answer's accept is not checked
            // (we talk to the browser we started).
            let head = format!(
                "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c2hhcmRnYXRlY29uc29sZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.expect("send the upgrade");
            let mut buf = Vec::new();
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await.expect("read the upgrade");
                assert!(n > 0, "DevTools closed the connection during the upgrade");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 101"), "no WebSocket upgrade: {head}");
            WebSocket {
                stream,
                buf: buf[end..].to_vec(),
            }
        })
        .await
    }

    async fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&f).await.expect("write a frame");
    }

    async fn send_text(&mut self, text: &str) {
        self.frame(0x1, text.as_bytes()).await;
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = vec![0u8; 64 * 1024];
            let got = self.stream.read(&mut chunk).await.expect("read a frame");
            assert!(got > 0, "DevTools closed the WebSocket");
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// The next whole text message (fragments joined; pings answered).
    async fn read_text(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let h = self.take(2).await;
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0F);
            let masked = h[1] & 0x80 != 0;
            let len = match h[1] & 0x7F {
                126 => {
                    let b = self.take(2).await;
                    u16::from_be_bytes([b[0], b[1]]) as usize
                }
                127 => {
                    let b = self.take(8).await;
                    u64::from_be_bytes(b.try_into().expect("8 bytes")) as usize
                }
                n => n as usize,
            };
            let mask = if masked {
                Some(self.take(4).await)
            } else {
                None
            };
            let mut payload = self.take(len).await;
            if let Some(m) = mask {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= m[i % 4];
                }
            }
            match opcode {
                0x9 => self.frame(0xA, &payload).await,
                0xA => {}
                0x8 => panic!("DevTools closed the WebSocket"),
                _ => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8(message).expect("a text message");
                    }
                }
            }
        }
    }
}
