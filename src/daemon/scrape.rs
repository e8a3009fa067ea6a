//! The Prometheus scrape endpoint: `GET /metrics`, and a landing page at `/`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use tiny_http::{Header, Method, Response, Server};

use super::metrics::Metrics;
use crate::engine::Engine;

const LANDING_PAGE: &str = "<!doctype html>\n<title>knockq</title>\n<h1>knockq</h1>\n\
<p>Port-knocking gate. Metrics: <a href=\"/metrics\">/metrics</a></p>\n";

pub struct ScrapeServer {
    server: Arc<Server>,
    thread: JoinHandle<()>,
}

impl ScrapeServer {
    pub fn start(
        listen: SocketAddr,
        metrics: Arc<Metrics>,
        engine: Arc<Engine>,
    ) -> io::Result<Self> {
        let server = Arc::new(Server::http(listen).map_err(io::Error::other)?);
        let serving = Arc::clone(&server);
        let thread = thread::Builder::new()
            .name("knockq-metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = match (request.method(), request.url()) {
                        (Method::Get | Method::Head, "/metrics") => {
                            Response::from_string(metrics.render(engine.tracked_sources()))
                                .with_header(header("text/plain; version=0.0.4; charset=utf-8"))
                        }
                        (Method::Get | Method::Head, "/") => Response::from_string(LANDING_PAGE)
                            .with_header(header("text/html; charset=utf-8")),
                        (Method::Get | Method::Head, _) => {
                            Response::from_string("not found\n").with_status_code(404)
                        }
                        _ => Response::from_string("method not allowed\n").with_status_code(405),
                    };
                    let _ = request.respond(response);
                }
            })?;
        Ok(ScrapeServer { server, thread })
    }

    pub fn stop(self) {
        self.server.unblock();
        let _ = self.thread.join();
    }
}

fn header(content_type: &str) -> Header {
    Header::from_bytes("Content-Type", content_type).expect("a valid header")
}
