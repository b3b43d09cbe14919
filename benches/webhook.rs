//! Benchmark of the pod identity webhook's own latency and memory (run by
//! `bash benches/webhook.sh`, or `cargo bench --bench webhook`).
//!
//! The server runs in a child process of its own (this binary with `--serve`), on one
//! current-thread runtime as in the daemon, with 1,000 ServiceAccounts cached (every fourth
//! annotated for AWS, like a cluster where some workloads use a role). The parent sends
//! AdmissionReviews shaped as kube-apiserver sends them over TLS, 50 at once (50 kept-alive
//! connections, as the apiserver's client pool would), and reports p50/p99/max of the round
//! trip, the server's CPU time per review, and the child's VmRSS with no ServiceAccount cached
//! and with 1,000.
//!
//! `WEBHOOK_BENCH_SERVER_CPUS=1` starts the server under `taskset -c 1` (start the bench itself
//! under `taskset -c 0` to give the load generator the other core): on a 2-core machine that is
//! the fair setup, where client and server do not take turns on the same cores.

use std::io::{BufRead as _, Write as _};
use std::time::{Duration, Instant};

use irsa_agent::config::webhook::WebhookSettings;
use irsa_agent::host::HostRoot;
use irsa_agent::webhook::{self, ServiceAccounts};
use serde_json::{Value, json};

const REVIEW: &str = include_str!("../tests/data/webhook/review-pod.json");
const SERVICE_ACCOUNTS: usize = 1000;
const CONCURRENCY: usize = 50;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process, from /proc (clock ticks of 10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1.to_string();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn service_account(i: usize) -> Value {
    let mut annotations = json!({
        "kubectl.kubernetes.io/last-applied-configuration": format!("{{\"apiVersion\":\"v1\",\"kind\":\"ServiceAccount\",\"metadata\":{{\"name\":\"sa-{i}\"}}}}"),
    });
    if i.is_multiple_of(4) {
        annotations["eks.amazonaws.com/role-arn"] =
            format!("arn:aws:iam::123456789012:role/workload-{i}").into();
        annotations["eks.amazonaws.com/token-expiration"] = "3600".into();
    }
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
        "namespace": format!("ns-{}", i % 50), "name": format!("sa-{i}"),
        "uid": format!("00000000-0000-0000-0000-{i:012}"), "resourceVersion": format!("{}", 1000 + i),
        "annotations": annotations,
    }})
}

/// The child: serves, fills the cache when told, reports its port and bundle on stdout.
fn serve() {
    let dir = std::env::temp_dir().join(format!("irsa-webhook-bench-{}", std::process::id()));
    let root = HostRoot::new(&dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut settings = WebhookSettings {
            enabled: true,
            ..Default::default()
        };
        settings.listen = "127.0.0.1:0".parse().expect("addr");
        let cache = ServiceAccounts::default();
        let running =
            webhook::start(&root, &settings, cache.clone(), webhook::unix_now()).expect("start");
        let bundle = running.bundle.borrow().clone();
        println!(
            "{} {}",
            running.local_addr.port(),
            bundle.replace('\n', "|")
        );
        let _ = std::io::stdout().flush();
        // Commands on stdin: "fill" fills the cache, "quit" ends.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        while let Some(command) = rx.recv().await {
            match command.as_str() {
                "fill" => {
                    for i in 0..SERVICE_ACCOUNTS {
                        cache.upsert(&service_account(i));
                    }
                    println!("filled {}", cache.len());
                }
                _ => break,
            }
            let _ = std::io::stdout().flush();
        }
        running.stop();
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn load(client: &reqwest::Client, url: &str, per_task: usize) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let client = client.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(per_task);
            for r in 0..per_task {
                let i = (t * per_task + r) % SERVICE_ACCOUNTS;
                let mut review: Value = serde_json::from_str(REVIEW).expect("review");
                review["request"]["namespace"] = format!("ns-{}", i % 50).into();
                review["request"]["object"]["metadata"]["namespace"] =
                    format!("ns-{}", i % 50).into();
                review["request"]["object"]["spec"]["serviceAccountName"] =
                    format!("sa-{i}").into();
                let body = serde_json::to_vec(&review).expect("json");
                let started = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("request");
                let status = response.status();
                let bytes = response.bytes().await.expect("body");
                times.push(started.elapsed());
                assert!(status.is_success(), "{status}");
                assert!(!bytes.is_empty());
            }
            times
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

fn main() {
    if std::env::args().any(|a| a == "--serve") {
        serve();
        return;
    }
    let per_task: usize = std::env::var("WEBHOOK_BENCH_REQUESTS_PER_CONNECTION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let exe = std::env::current_exe().expect("exe");
    let pinned = std::env::var("WEBHOOK_BENCH_SERVER_CPUS").ok();
    let mut command = match &pinned {
        Some(cpus) => {
            let mut c = std::process::Command::new("taskset");
            c.arg("-c").arg(cpus).arg(&exe);
            c
        }
        None => std::process::Command::new(&exe),
    };
    let mut child = command
        .arg("--serve")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("port");
    let (port, bundle) = line.trim().split_once(' ').expect("port and bundle");
    let bundle = bundle.replace('|', "\n");
    let url = format!("https://127.0.0.1:{port}/mutate");
    let rss_started = rss_kib(pid);

    irsa_agent::publish::http::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(bundle.as_bytes()).expect("pem"))
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Warm up with an empty cache, then measure the RSS of the serving process.
    runtime.block_on(load(&client, &url, 20));
    let rss_empty = rss_kib(pid);
    writeln!(stdin, "fill").expect("fill");
    line.clear();
    stdout.read_line(&mut line).expect("filled");
    assert_eq!(line.trim(), format!("filled {SERVICE_ACCOUNTS}"));
    runtime.block_on(load(&client, &url, 20));
    let started = Instant::now();
    let ticks = cpu_ticks(pid);
    let mut times = runtime.block_on(load(&client, &url, per_task));
    let wall = started.elapsed();
    let server_cpu_ms = (cpu_ticks(pid) - ticks) as f64 * 10.0;
    let rss_full = rss_kib(pid);
    times.sort();
    let _ = writeln!(stdin, "quit");
    let _ = child.wait();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "webhook: {} AdmissionReviews, {CONCURRENCY} at once over {CONCURRENCY} TLS connections, {SERVICE_ACCOUNTS} ServiceAccounts cached",
        times.len()
    );
    println!(
        "  latency (round trip, client to server and back): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} reviews/s",
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.99)),
        ms(percentile(&times, 1.0)),
        times.len() as f64 / wall.as_secs_f64()
    );
    println!(
        "  server CPU: {:.3} ms per review{}",
        server_cpu_ms / times.len() as f64,
        pinned
            .as_deref()
            .map(|c| format!(" (server pinned to CPU {c})"))
            .unwrap_or_default()
    );
    println!(
        "  server process VmRSS: {:.1} MiB started, {:.1} MiB serving with 0 ServiceAccounts, {:.1} MiB serving with {SERVICE_ACCOUNTS}",
        rss_started as f64 / 1024.0,
        rss_empty as f64 / 1024.0,
        rss_full as f64 / 1024.0
    );
}
