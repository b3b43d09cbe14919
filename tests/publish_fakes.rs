//! Azure Blob request shapes, against a tiny in-memory object store on 127.0.0.1 that records
//! every request and honours `If-Match` / `If-None-Match: *` as the service does. It runs
//! without Node.js; tests/publish_emulators.rs runs the same target against the real Azurite
//! (and the `gcs` target against fake-gcs-server, which replaced the GCS fake here).

mod support;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct State {
    objects: HashMap<String, (Vec<u8>, u64, String, String)>, // bytes, generation, type, cache
    requests: Vec<Request>,
    generation: u64,
}

struct Fake {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Fake {
    fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Fake { port, state }
    }

    fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("lock").requests.clone()
    }
}

fn serve(stream: std::net::TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
            return;
        };
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).expect("body");
        let request = Request {
            method: method.to_string(),
            path: percent_decode(path),
            headers,
            body,
        };
        let response = respond(&request, state);
        state.lock().expect("lock").requests.push(request);
        if writer.write_all(&response).is_err() {
            return;
        }
    }
}

/// Request paths may arrive percent-encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(r: &Request, state: &Mutex<State>) -> Vec<u8> {
    let mut s = state.lock().expect("lock");
    let key = r.path.split('?').next().unwrap_or_default().to_string();
    let etag = |g: u64| format!("\"0x8D{g:012}\"");
    let reply = |status: &str, headers: Vec<(String, String)>, body: &[u8]| {
        let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    };
    match r.method.as_str() {
        "GET" | "HEAD" => match s.objects.get(&key) {
            None => reply("404 Not Found", vec![], b""),
            Some((bytes, g, ct, cc)) => {
                let headers = vec![
                    ("ETag".into(), etag(*g)),
                    (
                        "Last-Modified".into(),
                        "Sun, 22 Nov 2026 07:00:00 GMT".into(),
                    ),
                    ("Content-Type".into(), ct.clone()),
                    ("Cache-Control".into(), cc.clone()),
                ];
                reply("200 OK", headers, bytes)
            }
        },
        "PUT" => {
            let current = s.objects.get(&key).map(|o| o.1);
            let ok = if r.headers.get("if-none-match").map(String::as_str) == Some("*") {
                current.is_none()
            } else if let Some(m) = r.headers.get("if-match") {
                current.map(etag) == Some(m.clone())
            } else {
                true
            };
            if !ok {
                return reply("412 Precondition Failed", vec![], b"");
            }
            s.generation += 1;
            let g = s.generation;
            let header = |name: &str| r.headers.get(name).cloned().unwrap_or_default();
            let (ct, cc) = (
                header("x-ms-blob-content-type"),
                header("x-ms-blob-cache-control"),
            );
            s.objects.insert(key, (r.body.clone(), g, ct, cc));
            reply("201 Created", vec![("ETag".into(), etag(g))], b"")
        }
        _ => reply("405 Method Not Allowed", vec![], b""),
    }
}

fn put_requests(requests: &[Request]) -> Vec<&Request> {
    requests.iter().filter(|r| r.method == "PUT").collect()
}

#[test]
fn azure_request_shapes() {
    let fake = Fake::start();
    let config = format!(
        "issuer: https://oidcacct.z6.web.core.windows.net/cluster-a\ndistribution: k3s\npublish:\n  - type: azure-blob\n    account: oidcacct\n    prefix: cluster-a\n    endpoint: http://127.0.0.1:{}\n    cache-control: \"public, max-age=60\"\n",
        fake.port
    );
    let host = support::k3s_host(&config);
    let key = "aXJzYS1hZ2VudC10ZXN0LWtleQ==";
    let env = [("AZURE_STORAGE_ACCOUNT_KEY", key)];
    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &env);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let requests = fake.requests();
    let puts = put_requests(&requests);
    assert_eq!(puts.len(), 2, "{requests:#?}");
    // The static website container `$web`; JWKS before discovery.
    assert_eq!(puts[0].path, "/$web/cluster-a/openid/v1/jwks");
    assert_eq!(
        puts[1].path,
        "/$web/cluster-a/.well-known/openid-configuration"
    );
    for p in &puts {
        assert_eq!(p.headers["if-none-match"], "*");
        assert_eq!(p.headers["x-ms-blob-type"], "BlockBlob");
        assert_eq!(p.headers["x-ms-blob-content-type"], "application/json");
        assert_eq!(p.headers["x-ms-blob-cache-control"], "public, max-age=60");
        assert!(
            p.headers["authorization"].starts_with("SharedKey oidcacct:"),
            "{:?}",
            p.headers
        );
    }
    // Unchanged: reads only.
    let before = fake.requests().len();
    let (code, stdout, _) = support::agent(host.path(), &["publish", "--no-verify"], &env);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(stdout.matches("up to date").count(), 2, "{stdout}");
    assert!(puts_after(&fake, before).is_empty());
    // A new Cache-Control: rewritten with If-Match on the ETag read.
    support::write_config(host.path(), &config.replace("max-age=60", "max-age=120"));
    let before = fake.requests().len();
    let (code, stdout, _) = support::agent(host.path(), &["publish", "--no-verify"], &env);
    assert_eq!(code, 0, "{stdout}");
    let new_puts = puts_after(&fake, before);
    assert_eq!(new_puts.len(), 2);
    for p in &new_puts {
        assert!(
            p.headers["if-match"].starts_with("\"0x8D"),
            "{:?}",
            p.headers
        );
        assert_eq!(p.headers["x-ms-blob-cache-control"], "public, max-age=120");
    }
}

fn puts_after(fake: &Fake, before: usize) -> Vec<Request> {
    fake.requests()[before..]
        .iter()
        .filter(|r| r.method == "PUT")
        .cloned()
        .collect()
}
