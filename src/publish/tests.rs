//! publish_all's ordering and failure handling, with in-memory targets.

use std::sync::{Arc, Mutex};

use super::*;

#[derive(Default)]
struct Memory {
    objects: Mutex<std::collections::HashMap<String, Vec<u8>>>,
    log: Arc<Mutex<Vec<String>>>,
    fail_puts: bool,
}

impl Target for Memory {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, TargetError>> {
        Box::pin(async move {
            Ok(self
                .objects
                .lock()
                .map_err(|_| TargetError::Failed("lock".into()))?
                .get(key)
                .map(|b| Stored {
                    bytes: b.clone(),
                    version: Version {
                        e_tag: Some(format!("{}", b.len())),
                        version: None,
                    },
                    content_type: Some(CONTENT_TYPE.into()),
                    cache_control: Some("c".into()),
                    problems: Vec::new(),
                }))
        })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        object: Object<'a>,
        _c: Condition,
    ) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            if let Ok(mut log) = self.log.lock() {
                log.push(key.to_string());
            }
            if self.fail_puts {
                return Err(TargetError::Failed("refused".into()));
            }
            if let Ok(mut objects) = self.objects.lock() {
                objects.insert(key.to_string(), object.bytes.to_vec());
            }
            Ok(())
        })
    }
}

fn publisher(target: Memory) -> Publisher {
    let t = PublishTarget::Directory {
        path: "/srv".into(),
        prefix: String::new(),
        cache_control: "c".into(),
        pages_headers: false,
        writable_by: Vec::new(),
    };
    Publisher {
        target: Box::new(target),
        layout: Layout::for_target(
            "https://o.example/a",
            "https://o.example/a/openid/v1/jwks",
            &t,
        ),
        cache_control: "c".into(),
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map(|rt| rt.block_on(f))
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

#[test]
fn every_jwks_before_any_discovery_and_failures_skip_discovery() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Memory {
        log: Arc::clone(&log),
        ..Memory::default()
    };
    let b = Memory {
        log: Arc::clone(&log),
        fail_puts: true,
        ..Memory::default()
    };
    let publication = Publication::new(
        "https://o.example/a",
        "https://o.example/a/openid/v1/jwks",
        &[],
    );
    let reports = block_on(publish_all(&[publisher(a), publisher(b)], &publication));
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    assert_eq!(
        log,
        [
            "openid/v1/jwks",
            "openid/v1/jwks",
            ".well-known/openid-configuration"
        ]
    );
    assert_eq!(reports[0].discovery.outcome, Outcome::Created);
    assert!(reports[1].failed());
    assert!(matches!(reports[1].discovery.outcome, Outcome::Skipped(_)));
}

#[test]
fn check_writes_nothing() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Memory {
        log: Arc::clone(&log),
        ..Memory::default()
    };
    let publication = Publication::new(
        "https://o.example/a",
        "https://o.example/a/openid/v1/jwks",
        &[],
    );
    let reports = block_on(check_all(&[publisher(a)], &publication));
    assert_eq!(reports[0].jwks.outcome, Outcome::Missing);
    assert_eq!(reports[0].discovery.outcome, Outcome::Missing);
    assert!(log.lock().map(|l| l.is_empty()).unwrap_or(false));
}
