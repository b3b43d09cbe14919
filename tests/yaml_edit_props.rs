//! Property tests for the byte-preserving YAML list editor and the flag model.
//!
//! Random k3s-style config files (block lists indented or compact, flow lists, plain / single /
//! double quotes, comments between items, CRLF, other keys around) get random edits (keep some
//! items in order, insert new ones anywhere). The result must parse to exactly the intended list
//! with every other key unchanged, and every line of the original that is not a removed item
//! must still be there, in order.

use irsa_agent::apiserver::edit::{self, Document, Item, Locator};
use irsa_agent::apiserver::flags::{self, Arg, ServiceAccountFlags};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Style {
    Block { indent: usize },
    Flow,
}

#[derive(Debug, Clone, Copy)]
enum Quote {
    Plain,
    Single,
    Double,
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z-]{0,12}=[A-Za-z0-9:/._,-]{0,24}",
        "--[a-z][a-z-]{0,12}=https://[a-z]{1,8}\\.example/[a-z]{0,6}",
        // Values that need quotes: spaces, `#`, `: `, quotes, leading indicators.
        "[a-z]{1,6}=[a-z]{0,4}( #|: |'|\"| )[a-z]{0,4}",
    ]
}

fn quote(v: &str, q: Quote) -> Option<String> {
    match q {
        Quote::Plain => {
            let parsed: Result<serde_yaml::Value, _> = serde_yaml::from_str(v);
            let safe = matches!(parsed, Ok(serde_yaml::Value::String(ref s)) if s == v)
                && !v.contains(" #")
                && !v.contains(": ")
                && !v.ends_with(':')
                && !v.contains(['\'', '"', ',', '[', ']', '{', '}']);
            safe.then(|| v.to_string())
        }
        Quote::Single => Some(format!("'{}'", v.replace('\'', "''"))),
        Quote::Double => Some(format!(
            "\"{}\"",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        )),
    }
}

/// Renders a config file with `items` under `kube-apiserver-arg`.
fn render(
    items: &[String],
    quotes: &[Quote],
    style: Style,
    comments: &[bool],
    crlf: bool,
) -> String {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut out = format!("# k3s{nl}write-kubeconfig-mode: \"0644\"{nl}{nl}");
    let q: Vec<String> = items
        .iter()
        .zip(quotes)
        .map(|(v, q)| quote(v, *q).unwrap_or_else(|| quote(v, Quote::Double).unwrap_or_default()))
        .collect();
    match style {
        Style::Block { indent } => {
            out.push_str(&format!("kube-apiserver-arg:{nl}"));
            for (i, item) in q.iter().enumerate() {
                if comments.get(i).copied().unwrap_or(false) {
                    out.push_str(&format!("{}# note {i}{nl}", " ".repeat(indent)));
                }
                out.push_str(&format!("{}- {item}", " ".repeat(indent)));
                if comments.get(i + 1).copied().unwrap_or(false) && i % 2 == 0 {
                    out.push_str(" # trailing");
                }
                out.push_str(nl);
            }
        }
        Style::Flow => {
            out.push_str(&format!("kube-apiserver-arg: [{}]{nl}", q.join(", ")));
        }
    }
    out.push_str(&format!(
        "tls-san:{nl}  - a.example{nl}node-label: [\"x=y\"]{nl}"
    ));
    out
}

fn edits(n: usize) -> impl Strategy<Value = Vec<Item>> {
    (
        proptest::collection::vec(any::<bool>(), n),
        proptest::collection::vec((0..=n, value()), 0..4),
    )
        .prop_map(move |(keep, inserts)| {
            let mut items = Vec::new();
            for i in 0..=n {
                for (at, v) in &inserts {
                    if *at == i {
                        items.push(Item::New(v.clone()));
                    }
                }
                if keep.get(i).copied().unwrap_or(false) {
                    items.push(Item::Keep(i));
                }
            }
            items
        })
}

fn case() -> impl Strategy<Value = (Vec<String>, Vec<Quote>, Style, Vec<bool>, bool, Vec<Item>)> {
    (1usize..6).prop_flat_map(|n| {
        (
            proptest::collection::vec(value(), n),
            proptest::collection::vec(
                prop_oneof![Just(Quote::Plain), Just(Quote::Single), Just(Quote::Double)],
                n,
            ),
            prop_oneof![
                Just(Style::Block { indent: 0 }),
                Just(Style::Block { indent: 2 }),
                Just(Style::Block { indent: 4 }),
                Just(Style::Flow)
            ],
            proptest::collection::vec(any::<bool>(), n + 1),
            any::<bool>(),
            edits(n),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn edits_mean_exactly_the_intended_list_and_keep_other_bytes(
        (items, quotes, style, comments, crlf, edit_items) in case()
    ) {
        let text = render(&items, &quotes, style, &comments, crlf);
        let doc = Document::parse(&text).expect("rendered YAML parses");
        let (loc, _) = doc
            .locate(Locator::TopLevel("kube-apiserver-arg"))
            .expect("locatable")
            .expect("present");
        // Round trip: the located items are the rendered values.
        let located: Vec<String> = loc.items.iter().map(|i| i.value.clone()).collect();
        prop_assert_eq!(&located, &items);

        let expected: Vec<String> = edit_items
            .iter()
            .map(|i| match i {
                Item::Keep(k) => items[*k].clone(),
                Item::New(v) => v.clone(),
            })
            .collect();
        let new = edit::edit_list(&doc, &loc, &edit_items).expect("edit");
        edit::check_only_list_changed(
            &doc.value,
            &new,
            Locator::TopLevel("kube-apiserver-arg"),
            &expected,
        )
        .map_err(|e| TestCaseError::fail(format!("{e}\n--- before\n{text}\n--- after\n{new}")))?;
        // Line endings stay what they were.
        if crlf {
            prop_assert_eq!(new.matches('\n').count(), new.matches("\r\n").count());
        } else {
            prop_assert!(!new.contains('\r'));
        }
        // Block lists: every line that is not a removed item survives, in order.
        if let Style::Block { .. } = style {
            let removed: Vec<&str> = (0..items.len())
                .filter(|i| !edit_items.contains(&Item::Keep(*i)))
                .map(|i| &text[loc.items[i].start..loc.items[i].end])
                .collect();
            let mut new_lines = new.split_inclusive('\n');
            let mut removed_left = removed.clone();
            for line in text.split_inclusive('\n') {
                // An emptied list becomes `key: []` on the key's line.
                if expected.is_empty() && line.starts_with("kube-apiserver-arg:") {
                    continue;
                }
                if let Some(pos) = removed_left.iter().position(|r| *r == line) {
                    removed_left.remove(pos);
                    continue;
                }
                prop_assert!(
                    new_lines.any(|l| l == line),
                    "line {:?} lost\n--- before\n{}\n--- after\n{}", line, text, new
                );
            }
        }
        // Editing again with everything kept changes nothing.
        let doc2 = Document::parse(&new).expect("parses");
        let (loc2, _) = doc2
            .locate(Locator::TopLevel("kube-apiserver-arg"))
            .expect("locatable")
            .expect("present");
        let keep_all: Vec<Item> = (0..loc2.items.len()).map(Item::Keep).collect();
        prop_assert_eq!(edit::edit_list(&doc2, &loc2, &keep_all).expect("edit"), new);
    }

    #[test]
    fn k3s_args_render_and_read_back(
        issuers in proptest::collection::vec("https://[a-z]{1,8}\\.example(/[a-z]{1,5})?", 1..4),
        audiences in proptest::collection::vec("[a-z0-9:/.]{1,20}", 1..4),
        other in proptest::collection::vec("[a-z][a-z-]{0,10}=[a-z0-9]{0,6}", 0..4),
    ) {
        // What `apply` writes as kube-apiserver-arg entries reads back as the same flags.
        let mut entries: Vec<String> = other.clone();
        for arg in flags::render_managed(flags::ISSUER, &issuers)
            .into_iter()
            .chain(flags::render_managed(flags::AUDIENCES, &audiences))
        {
            entries.push(format!("{}={}", arg.name, arg.value));
        }
        let defaults = [(flags::ISSUER.to_string(), "https://default".to_string())]
            .into_iter()
            .collect();
        let args: Vec<Arg> = flags::k3s_get_args(&defaults, &entries);
        let read = ServiceAccountFlags::from_args(&args);
        prop_assert_eq!(read.issuers, issuers);
        prop_assert_eq!(read.api_audiences, Some(audiences));
    }
}

/// Sequences nested on their parent's line (`- - a`) once sent the locator into an endless loop
/// that ate memory (found by `locating_never_panics`). Each case must finish within seconds.
#[test]
fn nested_sequences_on_one_line_terminate() {
    let cases = [
        "- - a\n",
        "---\n - - a\n",
        "- - - a\n  - b\n",
        "- a\n- - b\n  - c\n",
        "kube-apiserver-arg:\n- - a=b\n",
        "kube-apiserver-arg:\n  - - a=b\n    - c=d\n  - e=f\n",
        "spec:\n  containers:\n  - command:\n    - - kube-apiserver\n",
    ];
    for text in cases {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(doc) = Document::parse(text) {
                for locator in [
                    Locator::TopLevel("kube-apiserver-arg"),
                    Locator::ContainerCommand,
                ] {
                    let _ = doc.locate(locator);
                }
            }
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(),
            "locating in {text:?} did not finish"
        );
    }
    // A list holding a list is refused with a reason, not edited.
    let doc = Document::parse("kube-apiserver-arg:\n  - - a=b\n  - e=f\n").expect("parse");
    let err = doc
        .locate(Locator::TopLevel("kube-apiserver-arg"))
        .expect_err("a nested list is not an argument list");
    assert!(err.to_string().contains("expected strings"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the file holds, reading and locating never panics.
    #[test]
    fn locating_never_panics(
        text in "([a-z+-]{0,8}|kube-apiserver-arg|spec|containers|command)(:| |\n|- |  |#|\\[|\\]|,|\"|'|[a-z=/.]{0,6}|\r\n|\t|é|日本|\\\\){0,40}"
    ) {
        if let Ok(doc) = Document::parse(&text) {
            for locator in [Locator::TopLevel("kube-apiserver-arg"), Locator::ContainerCommand] {
                if let Ok(Some((loc, _))) = doc.locate(locator) {
                    let keep: Vec<Item> = (0..loc.items.len()).map(Item::Keep).collect();
                    let _ = edit::edit_list(&doc, &loc, &keep);
                    let mut more = keep.clone();
                    more.push(Item::New("x=y".into()));
                    if let Ok(new) = edit::edit_list(&doc, &loc, &more) {
                        let mut expected: Vec<String> = loc.items.iter().map(|i| i.value.clone()).collect();
                        expected.push("x=y".into());
                        // Either the edit means what it should, or the check says so.
                        let _ = edit::check_only_list_changed(&doc.value, &new, locator, &expected);
                    }
                }
            }
        }
    }
}
