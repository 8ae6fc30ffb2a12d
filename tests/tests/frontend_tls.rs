//! TLS on the front-end (`--listen-tls-cert/--listen-tls-key/--listen-tls-client-ca`) through a
//! real daemon and the conformance model: HTTP/JSON over HTTP/1.1 in TLS, gRPC over h2 in TLS
//! (ALPN), clients without a certificate from the client CA refused, plain TCP refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::sync::Arc;

use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_node::{parse_http1, request as request_of, HttpAnswer, ModelNode, WAIT};
use latticed_tests::{Certs, NodeCerts};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client_config(ca: &NodeCerts, me: Option<&NodeCerts>, alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match me {
        Some(me) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&me.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&me.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// An HTTP/1.1 request over TLS: the ALPN protocol agreed, and the answer (`Err`: the
/// connection failed before an answer).
async fn https(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    request: &str,
) -> Result<(Option<Vec<u8>>, HttpAnswer), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut raw))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if raw.is_empty() {
        return Err("no answer".into());
    }
    Ok((alpn, parse_http1(&raw)))
}

#[test]
fn the_front_end_serves_over_tls_with_client_certificates() {
    let certs = Certs::new();
    let server = certs.issue("localhost");
    let client = certs.issue("client1");
    let (cert, key, ca) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
        server.ca.display().to_string(),
    );
    let s = ModelNode::start(&[
        "--listen-tls-cert",
        &cert,
        "--listen-tls-key",
        &key,
        "--listen-tls-client-ca",
        &ca,
    ]);
    let body = r#"{"actions": [{"update": {"pncounter": {"change": 3}}}]}"#;
    let request = format!(
        "POST /tck/model/crdt/PNCounter-tls HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // HTTP/1.1 in TLS with a client certificate
    let (alpn, a) = s
        .node
        .block_on(https(
            s.frontend,
            client_config(&server, Some(&client), b"http/1.1"),
            &request,
        ))
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.text(), r#"{"state":{"pncounter":{"value":"3"}}}"#);
    // h2 is offered
    let alpn = s.node.block_on(async {
        let tcp = tokio::net::TcpStream::connect(s.frontend).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
            &server,
            Some(&client),
            b"h2",
        )));
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    });
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    // gRPC over h2 in TLS
    let r = s.node.block_on(async {
        let pem = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem(&server.ca)))
            .identity(tonic::transport::Identity::from_pem(
                pem(&client.cert),
                pem(&client.key),
            ))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", s.frontend))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        CrdtTckModelClient::new(channel)
            .process(request_of("PNCounter-tls", vec![]))
            .await
    });
    assert_eq!(
        r.unwrap().into_inner().state,
        Some(m::State {
            value: Some(m::state::Value::Pncounter(m::PnCounterValue { value: 3 }))
        })
    );
    // no client certificate: refused
    let refused = s.node.block_on(https(
        s.frontend,
        client_config(&server, None, b"http/1.1"),
        &request,
    ));
    assert!(refused.is_err(), "{refused:?}");
    // a client certificate from another CA: refused
    let other_ca = Certs::new();
    let other = other_ca.issue("client2");
    let refused = s.node.block_on(https(
        s.frontend,
        client_config(&server, Some(&other), b"http/1.1"),
        &request,
    ));
    assert!(refused.is_err(), "{refused:?}");
    // plain HTTP on the TLS port gets no HTTP answer
    let raw = s.node.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(s.frontend).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await;
        raw
    });
    assert!(!raw.starts_with(b"HTTP/"), "{raw:?}");
    // only the two accepted calls reached the entity
    assert_eq!(s.commands().len(), 2);
}
