//! Logging for the command line: plain lines on stderr, no timestamps (journald and terminals
//! add their own), `warning:`/`error:` prefixes as cargo prints them. The daemon switches to
//! native journald records ([`to_journal_if_there`]: priorities, no prefixes) when stderr is
//! the journal or it runs under systemd.

use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

/// Set once the daemon decided to log to journald.
static JOURNAL: OnceLock<systemd_journal_logger::JournalLog> = OnceLock::new();

/// Sends log records to journald instead of stderr when `JOURNAL_STREAM` says stderr is the
/// journal, or the process runs as a systemd service (`INVOCATION_ID`) and the journal socket
/// answers. Returns whether it did.
pub fn to_journal_if_there() -> bool {
    // The journal's socket is this process's logging endpoint, not host data: not under --root.
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some()
        && std::path::Path::new("/run/systemd/journal/socket").exists();
    if !systemd_journal_logger::connected_to_journal() && !under_systemd {
        return false;
    }
    match systemd_journal_logger::JournalLog::new() {
        Ok(journal) => JOURNAL.set(journal).is_ok() || JOURNAL.get().is_some(),
        Err(_) => false,
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Libraries' own records (kube-rs logs "failed with error client error (Connect)" at
        // error level for every request the agent retries) are for `-v`: the agent says what
        // failed and what it does about it.
        let ours = metadata.target().starts_with(env!("CARGO_CRATE_NAME"));
        metadata.level() <= log::max_level() && (ours || log::max_level() >= LevelFilter::Debug)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if let Some(journal) = JOURNAL.get() {
            journal.log(record);
            return;
        }
        let prefix = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        eprintln!("{prefix}{}", record.args());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// The level for `-v` counts and `-q`: info by default, then debug, then trace.
pub fn level(verbose: u8, quiet: bool) -> LevelFilter {
    if quiet {
        return LevelFilter::Warn;
    }
    match verbose {
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the stderr logger (once; later calls only change the level).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
