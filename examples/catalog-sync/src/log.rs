//! Progress as log lines on stderr, one event a line, in the logfmt shape
//! a log pipeline parses without configuration.

fn line(level: &str, message: &str) {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    eprintln!("ts={millis} level={level} app=catalog-sync msg={message:?}");
}

pub fn info(message: &str) {
    line("info", message);
}

pub fn warn(message: &str) {
    line("warn", message);
}
