//! The TLS listener (`tls: { listen, cert, key }`) through the real
//! gateway binary, with a self-signed certificate made here and a real
//! rustls client: a flash-sale rule is admitted over TLS exactly as over
//! plain HTTP (one stock for both listeners), HTTP/2 is negotiated by ALPN
//! and answers, the backend is told `X-Forwarded-Proto: https`, and
//! `sluice check` refuses a key that is not the certificate's. The
//! certificate handle's reload (what SIGHUP and the admin reload call) is
//! tested in process, on pingora's own acceptor: a new certificate serves
//! new handshakes, a bad one is refused and the old one stays.

use sluice_testkit as support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use pingora_core::tls::{
    install_default_crypto_provider, CertificateDer, ClientConfig, ClientTlsStream, RootCertStore,
    ServerName, TlsConnector,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{expect, free_addr, mall_config, put_stock, request, Gateway, Response, Upstream};

/// Bound on each connect and exchange.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A self-signed certificate for `localhost` and 127.0.0.1.
struct SelfSigned {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed() -> SelfSigned {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("make a self-signed certificate");
    SelfSigned {
        cert_pem: made.cert.pem(),
        key_pem: made.key_pair.serialize_pem(),
        der: made.cert.der().clone(),
    }
}

/// A gateway with a plain and a TLS listener over `mall`, and one rule
/// `phone`: `POST /api/seckill/{sku}/order`, user from `X-User-Id`.
fn start(mall: &Upstream, tls: SocketAddr, cert: &SelfSigned) -> Gateway {
    let config = mall_config(
        mall.addr(),
        &format!("tls: {{ listen: \"{tls}\", cert: tls/cert.pem, key: tls/key.pem }}\n"),
        "",
    );
    Gateway::builder()
        .config(&config)
        .file("tls/cert.pem", &cert.cert_pem)
        .file("tls/key.pem", &cert.key_pem)
        .file(
            "lua-free-rules/sale.yaml",
            "rules:\n  - name: phone\n    match: { method: POST, path: \"/api/seckill/{sku}/order\" }\n    \
             user: { header: X-User-Id }\n    sku: { path: sku }\n",
        )
        .start()
}

/// A TLS handshake with `addr` trusting `roots`, offering `alpn`.
async fn try_connect(
    addr: SocketAddr,
    roots: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
) -> std::io::Result<ClientTlsStream<TcpStream>> {
    install_default_crypto_provider();
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).expect("add the test root");
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").expect("server name");
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect in time")?;
    tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
}

/// [`try_connect`], which must succeed.
async fn connect(
    addr: SocketAddr,
    roots: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
) -> ClientTlsStream<TcpStream> {
    try_connect(addr, roots, alpn).await.expect("TLS handshake")
}

/// One HTTP/1.1 request over a fresh TLS connection (ALPN `http/1.1`).
async fn h1(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response {
    let tls = connect(addr, &[root], &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake over TLS");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = if method == "POST" { "{}" } else { "" };
    let req = req
        .header("content-length", body.len().to_string())
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
        .to_vec();
    driver.abort();
    response(parts.status, &parts.headers, body)
}

fn response(status: http::StatusCode, headers: &http::HeaderMap, body: Vec<u8>) -> Response {
    Response {
        status: status.as_u16(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    }
}

/// One HTTP/2 request on `client`; `body` is sent when given.
async fn h2_send(
    client: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&'static [u8]>,
) -> Response {
    let mut req = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(()).expect("request");
    let mut ready = client.clone().ready().await.expect("h2 stream ready");
    let (pending, mut stream) = ready
        .send_request(req, body.is_none())
        .expect("send h2 request");
    if let Some(body) = body {
        stream
            .send_data(Bytes::from_static(body), true)
            .expect("send h2 body");
    }
    let resp = tokio::time::timeout(TIMEOUT, pending)
        .await
        .expect("h2 answer in time")
        .expect("h2 answer");
    let (parts, mut body) = resp.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = tokio::time::timeout(TIMEOUT, body.data())
        .await
        .expect("h2 body in time")
    {
        let chunk = chunk.expect("h2 body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    response(parts.status, &parts.headers, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_rule_is_admitted_over_tls_as_over_http() {
    let mall = Upstream::start();
    let cert = self_signed();
    let tls = free_addr();
    let gw = start(&mall, tls, &cert);
    put_stock(gw.admin(), "phone", "p1", 1).await;

    let order = "/api/seckill/p1/order";
    let first = h1(tls, &cert.der, "POST", order, &[("x-user-id", "u1")]).await;
    expect(&first, 200, "forwarded");
    let seen = mall.last().expect("the mall got the order");
    assert_eq!(seen.uri, order);
    assert_eq!(seen.header("x-sluice-rule"), Some("phone"));
    assert_eq!(seen.header("x-sluice-ticket").map(str::len), Some(32));
    // TLS ended at the gateway: the backend is told so.
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));

    // One stock for both listeners: sold out over TLS and over HTTP.
    let second = h1(tls, &cert.der, "POST", order, &[("x-user-id", "u2")]).await;
    expect(&second, 410, "sold_out");
    let plain = request(
        gw.listen(),
        "POST",
        order,
        &[("x-user-id", "u3"), ("content-type", "application/json")],
        b"{}",
    )
    .await;
    expect(&plain, 410, "sold_out");
    // A client's own X-Sluice-* and X-Forwarded-Proto do not pass.
    let pass = h1(
        tls,
        &cert.der,
        "GET",
        "/items/1",
        &[("x-sluice-ticket", "forged"), ("x-forwarded-proto", "http")],
    )
    .await;
    expect(&pass, 200, "passthrough");
    let seen = mall.last().expect("the mall got the page");
    assert!(seen.header("x-sluice-ticket").is_none());
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(mall.requests(), 2);

    // Counted when each request is logged, just after its answer.
    for (outcome, n) in [("forwarded", 1.0), ("sold_out", 2.0)] {
        gw.wait_metric(
            "sluice_requests_total",
            &[("rule", "phone"), ("outcome", outcome)],
            n,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_negotiated_by_alpn_and_answers() {
    let mall = Upstream::start();
    let cert = self_signed();
    let tls = free_addr();
    let gw = start(&mall, tls, &cert);
    put_stock(gw.admin(), "phone", "p1", 1).await;

    let conn = connect(tls, &[&cert.der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut client, driver) = h2::client::handshake(conn).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = driver.await;
    });
    let base = format!("https://localhost:{}", tls.port());

    let page = h2_send(
        &mut client,
        "GET",
        &format!("{base}/items/7?x=1"),
        &[],
        None,
    )
    .await;
    expect(&page, 200, "passthrough");
    assert_eq!(page.json()["uri"], "/items/7?x=1");

    // An order over h2 on the same connection: admitted, then sold out.
    let order = format!("{base}/api/seckill/p1/order");
    let json = [("x-user-id", "u1"), ("content-type", "application/json")];
    let won = h2_send(&mut client, "POST", &order, &json, Some(b"{}")).await;
    expect(&won, 200, "forwarded");
    let seen = mall.last().expect("the mall got the order");
    assert_eq!(seen.header("x-sluice-rule"), Some("phone"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    let json = [("x-user-id", "u2"), ("content-type", "application/json")];
    let lost = h2_send(&mut client, "POST", &order, &json, Some(b"{}")).await;
    expect(&lost, 410, "sold_out");
    assert_eq!(mall.requests(), 2);
    driver.abort();
}

/// `sluice check` on a gateway.yaml in `dir` whose tls names `cert`/`key`.
fn check_tls(dir: &Path, cert: &str, key: &str) -> (Option<i32>, String) {
    let yaml = format!(
        "listen: 127.0.0.1:8080\n\
         upstreams: {{ mall: {{ servers: [127.0.0.1:8000] }} }}\n\
         default_upstream: mall\n\
         tls:\n  listen: 127.0.0.1:8443\n  cert: {cert}\n  key: {key}\n"
    );
    std::fs::write(dir.join("gateway.yaml"), yaml).expect("write gateway.yaml");
    let out = support::sluice_cmd()
        .args(["check", "--config", "gateway.yaml"])
        .current_dir(dir)
        .output()
        .expect("run sluice check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn check_reads_the_certificate_and_refuses_a_key_that_is_not_its() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (self_signed(), self_signed());
    std::fs::write(dir.path().join("a.pem"), &a.cert_pem).expect("write");
    std::fs::write(dir.path().join("a.key"), &a.key_pem).expect("write");
    std::fs::write(dir.path().join("b.key"), &b.key_pem).expect("write");

    let (code, text) = check_tls(dir.path(), "a.pem", "a.key");
    assert_eq!(code, Some(0), "{text}");

    let (code, text) = check_tls(dir.path(), "a.pem", "b.key");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines().any(|l| l
            == "gateway.yaml:7:8: tls.key: ./b.key is not the private key of the certificate in ./a.pem"),
        "{text}"
    );
    // Swapped files: each named at its own key.
    let (code, text) = check_tls(dir.path(), "a.key", "a.pem");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "gateway.yaml:6:9: tls.cert: ./a.key holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) && text.contains("gateway.yaml:7:8: tls.key: ./a.pem holds no unencrypted PEM private key"),
        "{text}"
    );
}

/// Serves TLS handshakes on `listener` with pingora's acceptor built from
/// `certs`' listener settings; each connection gets `ok` and is closed.
fn serve(listener: tokio::net::TcpListener, certs: &Arc<sluice::tls::TlsCerts>) {
    let settings = sluice::tls::TlsCerts::settings(certs).expect("listener settings");
    let acceptor = Arc::new(settings.build());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let stream = pingora_core::protocols::l4::stream::Stream::from(tcp);
                if let Ok(mut tls) = acceptor.tls_handshake(stream).await {
                    let _ = tls.write_all(b"ok").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
}

/// The leaf certificate a new handshake is served, trusting every root given.
async fn served(addr: SocketAddr, roots: &[&CertificateDer<'static>]) -> Vec<u8> {
    let mut tls = connect(addr, roots, &[b"http/1.1"]).await;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("a served certificate");
    let mut ok = [0u8; 2];
    tls.read_exact(&mut ok).await.expect("the server's answer");
    assert_eq!(&ok, b"ok");
    leaf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_new_certificate_to_new_handshakes_and_keeps_a_good_one_over_a_bad_one() {
    use sluice::config::tls::TlsFile;
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (self_signed(), self_signed());
    let tls = sluice::config::TlsConfig {
        listen: free_addr(),
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let write = |cert: &str, key: &str| {
        std::fs::write(&tls.cert, cert).expect("write cert");
        std::fs::write(&tls.key, key).expect("write key");
    };
    write(&a.cert_pem, &a.key_pem);
    let certs = Arc::new(sluice::tls::TlsCerts::load(&tls).expect("load a"));
    assert_eq!(certs.leaf().as_deref(), Some(a.der.as_ref()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    serve(listener, &certs);
    let both = [&a.der, &b.der];
    assert_eq!(served(addr, &both).await, a.der.to_vec());

    // certbot renewed: the files hold b, the reload makes it served.
    write(&b.cert_pem, &b.key_pem);
    // Until the reload, a is still served.
    assert_eq!(served(addr, &both).await, a.der.to_vec());
    certs.reload(&tls).expect("reload b");
    assert_eq!(served(addr, &both).await, b.der.to_vec());
    // A client that trusts only the old certificate is now refused: b is
    // really what the handshake presents.
    assert!(try_connect(addr, &[&a.der], &[b"http/1.1"]).await.is_err());

    // A broken certificate, or a key that is not the certificate's, is
    // refused and b keeps serving.
    write("not a certificate", &a.key_pem);
    let err = certs.reload(&tls).expect_err("garbage refused");
    assert_eq!(err.file, TlsFile::Cert, "{err}");
    write(&a.cert_pem, &b.key_pem);
    let err = certs.reload(&tls).expect_err("mismatch refused");
    assert_eq!(err.file, TlsFile::Key, "{err}");
    assert!(err.to_string().contains("is not the private key"), "{err}");
    std::fs::remove_file(&tls.key).expect("remove key");
    let err = certs.reload(&tls).expect_err("missing key refused");
    assert!(
        err.to_string().starts_with("tls.key: cannot read "),
        "{err}"
    );
    assert_eq!(served(addr, &both).await, b.der.to_vec());
    assert_eq!(certs.leaf().as_deref(), Some(b.der.as_ref()));
}

/// The leaf certificate a new handshake with a real gateway is served.
async fn leaf_of(addr: SocketAddr, roots: &[&CertificateDer<'static>]) -> Vec<u8> {
    let tls = connect(addr, roots, &[b"http/1.1"]).await;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("a served certificate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_a_real_gateway_serve_a_renewed_certificate_and_refuses_a_broken_one() {
    let mall = Upstream::start();
    let tls = free_addr();
    let (a, b) = (self_signed(), self_signed());
    let g = start(&mall, tls, &a);
    let both = [&a.der, &b.der];
    assert_eq!(leaf_of(tls, &both).await, a.der.to_vec());

    // certbot's deploy hook: new files, then `systemctl reload sluice`.
    g.write("tls/cert.pem", &b.cert_pem);
    g.write("tls/key.pem", &b.key_pem);
    g.sighup();
    g.wait_metric("sluice_config_reloads_total", &[("result", "ok")], 1.0)
        .await;
    assert_eq!(leaf_of(tls, &both).await, b.der.to_vec());
    let resp = h1(tls, &b.der, "GET", "/goods/1", &[]).await;
    assert_eq!(resp.status, 200);

    // A key that is not the certificate's: refused, b keeps serving.
    g.write("tls/key.pem", &a.key_pem);
    let resp = request(g.admin(), "POST", "/admin/v1/reload", &[], b"").await;
    assert_eq!(resp.status, 422, "{}", resp.text());
    assert!(resp.text().contains("tls.key"), "{}", resp.text());
    assert_eq!(leaf_of(tls, &both).await, b.der.to_vec());
}
