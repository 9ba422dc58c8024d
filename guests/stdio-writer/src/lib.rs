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
        let net = connect_probe();
        let summary = format!("file={file:?} dir={dir:?} env={env:?} net={net:?}");
        println!("stdout says hello: {summary}");
        let _ = writeln!(std::io::stderr(), "stderr says hello");
        Disposition::Drop(summary)
    }
}

/// A TCP connect through `wasi:sockets` directly (std's `TcpStream` would
/// need a libc with sockets, which one of the two guest toolchains lacks).
fn connect_probe() -> Result<(), String> {
    use wasip2::sockets::instance_network::instance_network;
    use wasip2::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    use wasip2::sockets::tcp_create_socket::create_tcp_socket;
    let network = instance_network();
    let socket = create_tcp_socket(IpAddressFamily::Ipv4).map_err(|e| format!("{e:?}"))?;
    let address = IpSocketAddress::Ipv4(Ipv4SocketAddress { port: 22, address: (127, 0, 0, 1) });
    socket.start_connect(&network, address).map_err(|e| format!("{e:?}"))
}

export!(StdioWriter);
