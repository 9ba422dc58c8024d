//! `stdio-writer` (hostile fixture): tries the WASI capabilities a handler is
//! not granted (files, environment variables, network) and writes what it
//! found to stdout and stderr, which the host captures into its logs. It
//! answers `drop` with a summary so a test can check every attempt failed.

wit_bindgen::generate!({ world: "handler", path: "../../wit" });

use std::io::Write;

struct StdioWriter;

impl Guest for StdioWriter {
    fn handle(_event: Event) -> Disposition {
        let file = std::fs::read_to_string("/etc/passwd").map(|s| s.len()).map_err(|e| e.kind().to_string());
        let dir = std::fs::read_dir("/").map(|d| d.count()).map_err(|e| e.kind().to_string());
        let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        let net = std::net::TcpStream::connect("127.0.0.1:22").map(|_| ()).map_err(|e| e.kind().to_string());
        let summary = format!("file={file:?} dir={dir:?} env={env:?} net={net:?}");
        println!("stdout says hello: {summary}");
        let _ = writeln!(std::io::stderr(), "stderr says hello");
        Disposition::Drop(summary)
    }
}

export!(StdioWriter);
