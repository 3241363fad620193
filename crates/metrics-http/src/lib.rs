//! The Prometheus scrape endpoint of every ripcord daemon: `GET /metrics` answered from a
//! thread of its own with whatever `render` returns (OpenMetrics text, as
//! `prometheus-client` encodes it); a daemon may serve pages on other paths
//! ([`serve_with_pages`]: the configuration role's status page); any other path gets a 404
//! naming `/metrics`.
//!
//! Binding happens before this returns, so a bad or busy address is an error at start,
//! naming the address, never a silent missing endpoint.

use std::net::SocketAddr;

use anyhow::Context as _;

/// The content type of OpenMetrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `addr` from a thread named `metrics`; each scrape calls
/// `render`.
pub fn serve(addr: SocketAddr, render: impl Fn() -> String + Send + 'static) -> anyhow::Result<()> {
    serve_with_pages(addr, render, |_| None)
}

/// A page: its content type and body.
pub struct Page {
    pub content_type: &'static str,
    pub body: String,
}

/// Like [`serve`], answering other paths with `page(path)` when it has one.
pub fn serve_with_pages(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
    page: impl Fn(&str) -> Option<Page> + Send + 'static,
) -> anyhow::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let header = format!("Content-Type: {CONTENT_TYPE}")
        .parse::<tiny_http::Header>()
        .map_err(|()| anyhow::anyhow!("a bad static header"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    tiny_http::Response::from_string(render()).with_header(header.clone())
                } else if let Some(page) = page(request.url()) {
                    let mut response = tiny_http::Response::from_string(page.body);
                    if let Ok(h) =
                        format!("Content-Type: {}", page.content_type).parse::<tiny_http::Header>()
                    {
                        response = response.with_header(h);
                    }
                    response
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_the_rendered_text_and_404s_elsewhere() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        serve(addr, || "ripcord_up 1\n".to_owned()).unwrap();
        let ok = get(addr, "/metrics");
        assert!(
            ok.starts_with("HTTP/1.0 200") || ok.starts_with("HTTP/1.1 200"),
            "{ok}"
        );
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.ends_with("ripcord_up 1\n"), "{ok}");
        assert!(
            get(addr, "/other").contains(" 404"),
            "a non-metrics path answered"
        );
        let e = format!("{:#}", serve(addr, String::new).unwrap_err());
        assert!(
            e.contains(&addr.to_string()),
            "a busy address is not named: {e}"
        );
    }
}
