//! Serving an axum `Router` over TLS: handshake with a timeout, the tablet's verified device
//! id attached to every request as [`ClientIdentity`], HTTP/1.1 and HTTP/2, and graceful
//! shutdown with every connection task owned by the server.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::ConnectInfo;
use cpis_protocol::DeviceId;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tower::Layer as _;

use crate::pki::device_id_from_cert;

/// The verified client certificate's device, inserted as a request extension on every
/// request (None when the client sent no certificate). Handlers take
/// `Extension(ClientIdentity(device)): Extension<ClientIdentity>`.
///
/// The peer's address is inserted too, as `ConnectInfo<SocketAddr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIdentity(pub Option<DeviceId>);

/// Timeouts for [`serve_with_options`]; [`serve`] uses the defaults.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// After shutdown is requested, how long in-flight requests get before their
    /// connections are dropped.
    pub shutdown_grace: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` over TLS until `shutdown` is cancelled; then stops accepting,
/// lets in-flight requests finish (up to 10 s), and returns. See [`serve_with_options`].
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_options(listener, config, app, shutdown, ServeOptions::default()).await
}

/// [`serve`] with explicit timeouts.
///
/// Each connection: TLS handshake (bounded by `handshake_timeout`), the device id read from
/// the verified peer certificate's subject CN, HTTP/1.1 or HTTP/2 (ALPN), and
/// [`ClientIdentity`] plus `ConnectInfo<SocketAddr>` in each request's extensions.
/// Per-connection errors are logged and never stop the server. Connection tasks live in a
/// `JoinSet` owned here; those still running after `shutdown_grace` are aborted.
pub async fn serve_with_options(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: CancellationToken,
    options: ServeOptions,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "serving HTTPS");
    let acceptor = TlsAcceptor::from(config);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // An HTTP/2 peer that stops answering pings is dropped (its streams with it).
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);

    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(joined) = connections.join_next() => log_join(joined),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(connection(
                        stream,
                        peer,
                        acceptor.clone(),
                        builder.clone(),
                        app.clone(),
                        shutdown.clone(),
                        options.handshake_timeout,
                    ));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%local, %error, "accepting a connection failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }

    drop(listener);
    tracing::info!(%local, open = connections.len(), "stopped accepting; finishing in-flight requests");
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while let Some(joined) = connections.join_next().await {
            log_join(joined);
        }
    })
    .await
    .is_ok();
    if !drained {
        tracing::warn!(
            %local,
            open = connections.len(),
            "in-flight requests did not finish in time; closing their connections"
        );
        connections.shutdown().await;
    }
    tracing::info!(%local, "server stopped");
    Ok(())
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "a connection task panicked");
    }
}

/// One connection, from TLS handshake to close.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    shutdown: CancellationToken,
    handshake_timeout: Duration,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "setting TCP_NODELAY failed");
    }
    let handshake = tokio::select! {
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)) => handshake,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out");
            return;
        }
    };
    let device = match peer_device(&tls) {
        Ok(device) => device,
        Err(reason) => {
            tracing::warn!(%peer, %reason, "verified client certificate names no device; closing");
            return;
        }
    };
    tracing::debug!(%peer, device = ?device, "TLS connection established");

    let service = Extension(ConnectInfo(peer)).layer(Extension(ClientIdentity(device)).layer(app));
    let service = TowerToHyperService::new(service);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// The device named by the verified client certificate, if the client sent one.
fn peer_device(tls: &TlsStream<TcpStream>) -> Result<Option<DeviceId>, crate::pki::PkiError> {
    let (_, session) = tls.get_ref();
    match session.peer_certificates().and_then(|certs| certs.first()) {
        None => Ok(None),
        Some(leaf) => device_id_from_cert(leaf).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{IssuedCert, Pki};
    use axum::routing::get;
    use chrono::Utc;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::AsyncReadExt as _;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    async fn whoami(Extension(ClientIdentity(device)): Extension<ClientIdentity>) -> String {
        device.map_or_else(|| "none".to_owned(), |d| d.to_string())
    }

    fn app() -> Router {
        Router::new().route("/whoami", get(whoami))
    }

    struct Server {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<io::Result<()>>,
    }

    impl Server {
        async fn start(pki: &Pki, app: Router, options: ServeOptions) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let config = pki.server_tls_config().unwrap();
            let task = tokio::spawn(serve_with_options(
                listener,
                config,
                app,
                shutdown.clone(),
                options,
            ));
            Server {
                addr,
                shutdown,
                task,
            }
        }

        fn url(&self, path: &str) -> String {
            format!("https://127.0.0.1:{}{path}", self.addr.port())
        }

        /// Cancels and checks that serve() returns promptly and cleanly.
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("serve() did not return within 2 s of cancellation")
                .unwrap()
                .unwrap();
        }
    }

    fn new_pki() -> (tempfile::TempDir, Pki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        (dir, pki)
    }

    /// What a tablet does at enrolment: make a key pair, send a CSR, get a certificate back.
    /// Returns (certificate PEM, private key PEM).
    fn enrol(
        pki: &Pki,
        device: DeviceId,
        valid_for: chrono::Duration,
        now: chrono::DateTime<Utc>,
    ) -> (IssuedCert, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = pki
            .issue_device_certificate(&csr, device, valid_for, now)
            .unwrap();
        (issued, key.serialize_pem())
    }

    /// The client recipe for the agent: a rustls ClientConfig with the ring provider that
    /// trusts only `ca_pem` and optionally presents a client certificate, handed to reqwest.
    fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .https_only(true)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    async fn whoami_text(client: &reqwest::Client, server: &Server) -> reqwest::Result<String> {
        client
            .get(server.url("/whoami"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }

    #[tokio::test]
    async fn client_without_certificate_is_anonymous() {
        let (_dir, pki) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let client = client(pki.ca_cert_pem(), None);
        let response = client.get(server.url("/whoami")).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.text().await.unwrap(), "none");
        server.stop().await;
    }

    #[tokio::test]
    async fn enrolled_device_is_identified_over_http2_and_http1() {
        let (_dir, pki) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let device = DeviceId::new();
        let (issued, key_pem) = enrol(&pki, device, chrono::Duration::days(30), Utc::now());
        let client = client(pki.ca_cert_pem(), Some((&issued.pem, &key_pem)));
        assert_eq!(
            whoami_text(&client, &server).await.unwrap(),
            device.to_string()
        );

        let http1 = client
            .get(server.url("/whoami"))
            .version(reqwest::Version::HTTP_11)
            .send()
            .await;
        // reqwest negotiates by ALPN; asking for HTTP/1.1 on an h2 connection still works.
        assert_eq!(http1.unwrap().text().await.unwrap(), device.to_string());
        server.stop().await;
    }

    #[tokio::test]
    async fn builder_api_with_process_default_ring_provider_works_too() {
        // The alternative recipe: install ring as the process default and use reqwest's own
        // builder methods. `install_default` fails harmlessly if already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (_dir, pki) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let device = DeviceId::new();
        let (issued, key_pem) = enrol(&pki, device, chrono::Duration::days(30), Utc::now());
        let client = reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_cert_pem().as_bytes()).unwrap()])
            .identity(
                reqwest::Identity::from_pem(format!("{}{}", issued.pem, key_pem).as_bytes())
                    .unwrap(),
            )
            .resolve("localhost", server.addr)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let url = format!("https://localhost:{}/whoami", server.addr.port());
        let text = client.get(url).send().await.unwrap().text().await.unwrap();
        assert_eq!(text, device.to_string());
        server.stop().await;
    }

    #[tokio::test]
    async fn certificate_from_another_ca_fails_the_handshake() {
        let (_dir, pki) = new_pki();
        let (_other_dir, other) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let (issued, key_pem) = enrol(
            &other,
            DeviceId::new(),
            chrono::Duration::days(1),
            Utc::now(),
        );
        let client = client(pki.ca_cert_pem(), Some((&issued.pem, &key_pem)));
        assert!(whoami_text(&client, &server).await.is_err());

        // The server keeps serving others.
        let anonymous = self::client(pki.ca_cert_pem(), None);
        assert_eq!(whoami_text(&anonymous, &server).await.unwrap(), "none");
        server.stop().await;
    }

    #[tokio::test]
    async fn expired_certificate_fails_the_handshake() {
        let (_dir, pki) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let two_hours_ago = Utc::now() - chrono::Duration::hours(2);
        let (issued, key_pem) = enrol(
            &pki,
            DeviceId::new(),
            chrono::Duration::hours(1),
            two_hours_ago,
        );
        assert!(issued.expires_at < Utc::now());
        let client = client(pki.ca_cert_pem(), Some((&issued.pem, &key_pem)));
        assert!(whoami_text(&client, &server).await.is_err());
        server.stop().await;
    }

    #[tokio::test]
    async fn client_that_does_not_trust_the_ca_fails() {
        let (_dir, pki) = new_pki();
        let (_other_dir, other) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let client = client(other.ca_cert_pem(), None);
        let err = whoami_text(&client, &server).await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn returns_promptly_when_idle_even_with_a_kept_alive_connection() {
        let (_dir, pki) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        // A finished request leaves an idle keep-alive connection open.
        let client = client(pki.ca_cert_pem(), None);
        assert_eq!(whoami_text(&client, &server).await.unwrap(), "none");
        let addr = server.addr;
        server.stop().await;
        // No longer accepting.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn in_flight_request_finishes_after_shutdown_is_requested() {
        let (_dir, pki) = new_pki();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let hooks = Arc::new(std::sync::Mutex::new(Some((started_tx, release_rx))));
        let app = Router::new().route(
            "/slow",
            get(move || {
                let hooks = hooks.clone();
                async move {
                    let (started, release) = hooks.lock().unwrap().take().unwrap();
                    started.send(()).unwrap();
                    release.await.unwrap();
                    "done"
                }
            }),
        );
        let server = Server::start(&pki, app, ServeOptions::default()).await;
        let client = client(pki.ca_cert_pem(), None);
        let request = tokio::spawn(client.get(server.url("/slow")).send());
        started_rx.await.unwrap();
        server.shutdown.cancel();
        release_tx.send(()).unwrap();
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.text().await.unwrap(), "done");
        tokio::time::timeout(Duration::from_secs(2), server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn stuck_request_is_cut_off_after_the_grace_period() {
        let (_dir, pki) = new_pki();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let started = Arc::new(std::sync::Mutex::new(Some(started_tx)));
        let app = Router::new().route(
            "/stuck",
            get(move || {
                let started = started.clone();
                async move {
                    if let Some(tx) = started.lock().unwrap().take() {
                        tx.send(()).unwrap();
                    }
                    std::future::pending::<()>().await;
                }
            }),
        );
        let options = ServeOptions {
            shutdown_grace: Duration::from_millis(200),
            ..ServeOptions::default()
        };
        let server = Server::start(&pki, app, options).await;
        let client = client(pki.ca_cert_pem(), None);
        let request = tokio::spawn(client.get(server.url("/stuck")).send());
        started_rx.await.unwrap();
        server.stop().await;
        assert!(request.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn silent_client_is_dropped_after_the_handshake_timeout() {
        let (_dir, pki) = new_pki();
        let options = ServeOptions {
            handshake_timeout: Duration::from_millis(200),
            ..ServeOptions::default()
        };
        let server = Server::start(&pki, app(), options).await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
            .await
            .expect("the server did not close a silent connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // And it still serves.
        let client = client(pki.ca_cert_pem(), None);
        assert_eq!(whoami_text(&client, &server).await.unwrap(), "none");
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_instead_of_tls_does_not_stop_the_server() {
        use tokio::io::AsyncWriteExt as _;
        let (_dir, pki) = new_pki();
        let server = Server::start(&pki, app(), ServeOptions::default()).await;
        let mut plain = TcpStream::connect(server.addr).await.unwrap();
        plain
            .write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf).await;
        let client = client(pki.ca_cert_pem(), None);
        assert_eq!(whoami_text(&client, &server).await.unwrap(), "none");
        server.stop().await;
    }
}
