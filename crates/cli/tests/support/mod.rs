//! What more than one of the CLI's test binaries needs.

/// A TCP port free on 127.0.0.1 right now, for a server under test to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
