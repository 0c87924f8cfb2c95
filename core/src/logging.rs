//! Log output: one line per event on stderr, led by the configured prefix, quiet unless `debug` is on.
//! Info and above always print (start, crashes, shutdown); debug adds worker start/exit and every route.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// Writes `prefix LEVEL message key=value ...`.
struct PrefixFormat {
    prefix: String,
}

impl<S, N> FormatEvent<S, N> for PrefixFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = *event.metadata().level();
        let label = match level {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(writer, "{} {label} ", self.prefix)?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the process-wide logger (once; later calls keep the first). `debug` lowers the level to debug.
pub fn init(prefix: &str, debug: bool) {
    let level = if debug { Level::DEBUG } else { Level::INFO };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(PrefixFormat { prefix: prefix.to_string() })
        .try_init();
}
