//! User-function discovery: validation of `EntitySpec`s (against the conformance model's real
//! descriptors and broken ones), entity-id extraction, and the discovery client against a
//! user function served over real h2c on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use latticed::userfn::{validate, Discovery};
use latticed_proto::cloudstate::entity_discovery_server::{EntityDiscovery, EntityDiscoveryServer};
use latticed_proto::cloudstate::{
    entity_passivation_strategy, Entity, EntityPassivationStrategy, EntitySpec, ProxyInfo,
    ServiceInfo, TimeoutPassivationStrategy, UserFunctionError,
};
use latticed_tests::model;
use prost::Message;

const CRDT: &str = "cloudstate.crdt.Crdt";

fn entity(service: &str, passivation_ms: Option<i64>) -> Entity {
    Entity {
        entity_type: CRDT.into(),
        service_name: service.into(),
        persistence_id: service.rsplit('.').next().unwrap().into(),
        passivation_strategy: passivation_ms.map(|ms| EntityPassivationStrategy {
            strategy: Some(entity_passivation_strategy::Strategy::Timeout(
                TimeoutPassivationStrategy { timeout: ms },
            )),
        }),
    }
}

fn model_spec() -> EntitySpec {
    EntitySpec {
        proto: model::DESCRIPTORS.to_vec(),
        entities: vec![
            entity("cloudstate.tck.model.crdt.CrdtTckModel", None),
            entity("cloudstate.tck.model.crdt.CrdtTwo", None),
            entity("cloudstate.tck.model.crdt.CrdtConfigured", Some(100)),
        ],
        service_info: Some(ServiceInfo {
            service_name: "conformance-model".into(),
            protocol_major_version: 0,
            protocol_minor_version: 2,
            ..Default::default()
        }),
    }
}

#[test]
fn the_conformance_model_spec_is_valid() {
    let m = validate(&model_spec()).unwrap();
    assert_eq!(m.entities.len(), 3);
    let tck = &m.entities[0];
    assert_eq!(tck.persistence_id, "CrdtTckModel");
    let names: Vec<&str> = tck.methods.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["Process", "ProcessStreamed"]);
    assert_eq!(
        tck.methods[0].path,
        "/cloudstate.tck.model.crdt.CrdtTckModel/Process"
    );
    assert!(!tck.methods[0].streamed);
    assert!(tck.methods[1].streamed);
    assert_eq!(m.entities[2].passivation, Some(Duration::from_millis(100)));
    assert_eq!(m.entities[0].passivation, None);
    // the entity id is the key field's value
    let req = model::Request {
        id: "GCounter-7".into(),
        actions: vec![],
    }
    .encode_to_vec();
    assert_eq!(tck.methods[0].entity_id(&req).unwrap(), "GCounter-7");
    assert_eq!(
        tck.methods[0].entity_id(&[]).unwrap(),
        "",
        "an unset key is its default"
    );
    assert!(
        tck.methods[0].entity_id(&[0xff, 0xff]).is_err(),
        "undecodable requests are errors"
    );
}

fn problems(spec: &EntitySpec) -> Vec<String> {
    validate(spec).expect_err("the spec should be refused")
}

#[test]
fn broken_specs_are_refused_with_the_service_and_method_named() {
    let mut s = model_spec();
    s.entities
        .push(entity("cloudstate.tck.model.crdt.Missing", None));
    let p = problems(&s);
    assert!(
        p.iter()
            .any(|x| x.contains("cloudstate.tck.model.crdt.Missing")
                && x.contains("not in the descriptor set")),
        "{p:?}"
    );

    let mut s = model_spec();
    s.entities[1].entity_type = "cloudstate.eventsourced.EventSourced".into();
    let p = problems(&s);
    assert!(
        p.iter()
            .any(|x| x.contains("CrdtTwo") && x.contains("not supported")),
        "{p:?}"
    );

    let mut s = model_spec();
    s.proto = vec![0xde, 0xad, 0xbe, 0xef];
    assert!(problems(&s)[0].contains("descriptor set"));

    let mut s = model_spec();
    s.service_info.as_mut().unwrap().protocol_minor_version = 1;
    assert!(problems(&s)[0].contains("0.1"));

    let mut s = model_spec();
    s.entities.clear();
    assert!(problems(&s).iter().any(|x| x.contains("no entity")));

    // our own protocol's services: Crdt/handle is client-streaming, discover has no entity key
    let s = EntitySpec {
        proto: latticed_proto::FILE_DESCRIPTOR_SET.to_vec(),
        entities: vec![
            entity("cloudstate.crdt.Crdt", None),
            entity("cloudstate.EntityDiscovery", None),
        ],
        service_info: model_spec().service_info,
    };
    let p = problems(&s);
    assert!(
        p.iter()
            .any(|x| x.contains("cloudstate.crdt.Crdt.handle") && x.contains("client-streaming")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.contains("cloudstate.EntityDiscovery.discover") && x.contains("entity_key")),
        "{p:?}"
    );
}

#[derive(Clone, Default)]
struct FakeUserFunction {
    spec: Arc<Mutex<EntitySpec>>,
    seen: Arc<Mutex<Vec<ProxyInfo>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl EntityDiscovery for FakeUserFunction {
    async fn discover(
        &self,
        r: tonic::Request<ProxyInfo>,
    ) -> Result<tonic::Response<EntitySpec>, tonic::Status> {
        self.seen.lock().unwrap().push(r.into_inner());
        Ok(tonic::Response::new(self.spec.lock().unwrap().clone()))
    }
    async fn report_error(
        &self,
        r: tonic::Request<UserFunctionError>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        self.errors.lock().unwrap().push(r.into_inner().message);
        Ok(tonic::Response::new(()))
    }
}

#[tokio::test]
async fn discovery_waits_for_the_user_function_reports_problems_and_picks_up_a_fix() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let discovery = Discovery {
        addr: addr.clone(),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    };
    let running = tokio::spawn(async move { discovery.run().await });

    // the user function starts later, with a spec that names a missing service
    let fake = FakeUserFunction::default();
    let mut broken = model_spec();
    broken.entities[0].service_name = "cloudstate.tck.model.crdt.Nope".into();
    *fake.spec.lock().unwrap() = broken;
    let server = fake.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EntityDiscoveryServer::new(server))
            .serve(addr.parse().unwrap())
            .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.errors.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reportError received"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let errors = fake.errors.lock().unwrap().clone();
    assert!(
        errors[0].contains("cloudstate.tck.model.crdt.Nope"),
        "{errors:?}"
    );
    assert!(!running.is_finished(), "an invalid spec is not served");

    // fixed: discovery picks it up
    *fake.spec.lock().unwrap() = model_spec();
    let model = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(model.entities.len(), 3);
    let info = fake.seen.lock().unwrap()[0].clone();
    assert_eq!(
        (info.protocol_major_version, info.protocol_minor_version),
        (0, 2)
    );
    assert_eq!(info.proxy_name, "latticed");
    assert_eq!(info.supported_entity_types, vec![CRDT.to_string()]);
    // the same broken spec was reported once, not once per try
    assert_eq!(fake.errors.lock().unwrap().len(), 1);
}
