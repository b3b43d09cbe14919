//! The Prometheus text format (0.0.4), written by the daemon's metrics endpoint and by the
//! rotation's metrics, without a metrics library.

/// Escapes a label value.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A Prometheus text exposition (format 0.0.4) being written: one family after another, each
/// with its HELP and TYPE lines, every name under the `irsa_agent_` prefix. The daemon's own
/// metrics and the rotation task's are written through it.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// One metric family: `kind` is `gauge` or `counter`; each sample is (`{labels}` or empty,
    /// value).
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (String, String)>,
    ) {
        self.text
            .push_str(&format!("# HELP irsa_agent_{name} {help}\n"));
        self.text
            .push_str(&format!("# TYPE irsa_agent_{name} {kind}\n"));
        for (labels, value) in samples {
            self.text
                .push_str(&format!("irsa_agent_{name}{labels} {value}\n"));
        }
    }

    /// A gauge with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help, [(String::new(), value.to_string())]);
    }

    pub fn finish(self) -> String {
        self.text
    }
}
