//! What a user function serves, validated: the model built from its `EntitySpec`.
//!
//! Pure functions (no IO): [`validate`] checks an `EntitySpec` as the protocol spec §6.1 says -
//! protocol version, a descriptor set whose imports resolve, at least one entity, every
//! entity's service present, a supported entity type, no client-streaming method, an entity key
//! on every method's input - and returns every problem found, each naming the service and
//! method. [`MethodModel::entity_id`] extracts an entity id from a request (§6.2).

use std::time::Duration;

use latticed_proto::cloudstate::{entity_passivation_strategy, Entity, EntitySpec};
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, MessageDescriptor,
    ServiceDescriptor, Value,
};

/// The entity type latticed hosts.
pub const CRDT_ENTITY_TYPE: &str = "cloudstate.crdt.Crdt";

/// The protocol version latticed speaks (and requires of support libraries).
pub const PROTOCOL_VERSION: (i32, i32) = (0, 2);

/// Field option extensions that mark entity key fields (spec Appendix A).
pub const ENTITY_KEY_EXTENSIONS: [&str; 2] =
    ["cloudstate.entity_key", "cloudstate.legacy_entity_key"];

/// One method of a served service.
#[derive(Debug, Clone)]
pub struct MethodModel {
    /// simple name, e.g. `Process`
    pub name: String,
    /// gRPC path, e.g. `/cloudstate.tck.model.crdt.CrdtTckModel/Process`
    pub path: String,
    /// input message
    pub input: MessageDescriptor,
    /// output message
    pub output: MessageDescriptor,
    /// top-level entity key fields of the input, in declaration order
    pub key_fields: Vec<FieldDescriptor>,
    /// its metric handles, registered once (counting a call then costs no lookup)
    pub metrics: std::sync::Arc<crate::metrics::MethodMetrics>,
    /// server-streaming
    pub streamed: bool,
}

/// One entity (a service) of a user function.
#[derive(Debug, Clone)]
pub struct EntityModel {
    /// the service
    pub service: ServiceDescriptor,
    /// namespace of its state: keys are `persistence_id + "-" + entity_id`
    pub persistence_id: String,
    /// its own idle timeout, if it set one
    pub passivation: Option<Duration>,
    /// its methods
    pub methods: Vec<MethodModel>,
}

/// A user function's validated spec.
#[derive(Debug, Clone)]
pub struct UserFunctionModel {
    /// every descriptor it sent
    pub pool: DescriptorPool,
    /// its entities (shared: a command's lookup does not copy them)
    pub entities: Vec<std::sync::Arc<EntityModel>>,
    /// what it said about itself (`name version (library version)`)
    pub description: String,
    /// a hash of the spec it came from (a changed spec has another)
    pub fingerprint: u64,
    /// the spec it came from, encoded (what this node advertises to the others)
    pub encoded: bytes::Bytes,
}

/// Why a request has no entity id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityIdError {
    /// the bytes are not the method's input message
    #[error("cannot decode the request as {message}: {reason}")]
    Decode {
        /// message name
        message: String,
        /// decoder's reason
        reason: String,
    },
}

impl MethodModel {
    /// The entity id of a request: the key fields' values as strings, joined with `-`; unset
    /// fields count as their defaults (spec §6.2).
    pub fn entity_id(&self, request: &[u8]) -> Result<String, EntityIdError> {
        let msg = DynamicMessage::decode(self.input.clone(), request).map_err(|e| {
            EntityIdError::Decode {
                message: self.input.full_name().to_string(),
                reason: e.to_string(),
            }
        })?;
        let parts: Vec<String> = self
            .key_fields
            .iter()
            .map(|f| value_string(&msg.get_field(f)))
            .collect();
        Ok(parts.join("-"))
    }
}

fn value_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::I32(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::U32(n) => n.to_string(),
        Value::U64(n) => n.to_string(),
        Value::F32(n) => n.to_string(),
        Value::F64(n) => n.to_string(),
        Value::EnumNumber(n) => n.to_string(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

fn key_fields(input: &MessageDescriptor, keys: &[ExtensionDescriptor]) -> Vec<FieldDescriptor> {
    input
        .fields()
        .filter(|f| {
            let options = f.options();
            keys.iter().any(|ext| {
                options.has_extension(ext) && options.get_extension(ext).as_bool() == Some(true)
            })
        })
        .collect()
}

/// A hash of a spec's encoding, to notice when a user function's spec changes.
pub fn fingerprint(spec: &EntitySpec) -> u64 {
    fingerprint_of(&prost::Message::encode_to_vec(spec))
}

/// A hash of an encoded spec.
pub fn fingerprint_of(encoded: &[u8]) -> u64 {
    let mut h = latticed_crdt::wire::Fnv::new();
    h.write(encoded);
    h.finish()
}

/// An entity's own idle timeout, if it declares one (a zero or negative one counts as none).
pub fn passivation_timeout(e: &Entity) -> Option<Duration> {
    e.passivation_strategy
        .as_ref()
        .and_then(|p| p.strategy.as_ref())
        .and_then(|s| match s {
            entity_passivation_strategy::Strategy::Timeout(t) => {
                u64::try_from(t.timeout).ok().filter(|ms| *ms > 0)
            }
        })
        .map(Duration::from_millis)
}

/// Validates a spec; every problem is returned, worded for the user function's developer.
pub fn validate(spec: &EntitySpec) -> Result<UserFunctionModel, Vec<String>> {
    let mut problems = Vec::new();
    let info = spec.service_info.clone().unwrap_or_default();
    let description = format!(
        "{} {} ({} {})",
        info.service_name,
        info.service_version,
        info.support_library_name,
        info.support_library_version
    );
    let version = (info.protocol_major_version, info.protocol_minor_version);
    if version != PROTOCOL_VERSION {
        problems.push(format!(
            "the support library speaks CloudState protocol {}.{}; latticed speaks {}.{}",
            version.0, version.1, PROTOCOL_VERSION.0, PROTOCOL_VERSION.1
        ));
    }
    let pool = match DescriptorPool::decode(spec.proto.as_slice()) {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!(
                "the descriptor set cannot be read (it must include every import): {e}"
            ));
            return Err(problems);
        }
    };
    if spec.entities.is_empty() {
        problems.push("the spec declares no entity".to_string());
    }
    let keys: Vec<ExtensionDescriptor> = ENTITY_KEY_EXTENSIONS
        .iter()
        .filter_map(|n| pool.get_extension_by_name(n))
        .collect();
    let mut entities = Vec::new();
    for e in &spec.entities {
        if e.entity_type != CRDT_ENTITY_TYPE {
            problems.push(format!(
                "service {}: entity type {:?} is not supported (latticed hosts {CRDT_ENTITY_TYPE})",
                e.service_name, e.entity_type
            ));
            continue;
        }
        let Some(service) = pool.get_service_by_name(&e.service_name) else {
            problems.push(format!(
                "service {} is not in the descriptor set",
                e.service_name
            ));
            continue;
        };
        let mut methods = Vec::new();
        for m in service.methods() {
            let path = format!("/{}/{}", service.full_name(), m.name());
            if m.is_client_streaming() {
                problems.push(format!(
                    "method {}.{} is client-streaming, which CRDT entities do not support",
                    service.full_name(),
                    m.name()
                ));
                continue;
            }
            let key_fields = key_fields(&m.input(), &keys);
            if key_fields.is_empty() {
                problems.push(format!(
                    "method {}.{}: its input {} has no field marked (cloudstate.entity_key)",
                    service.full_name(),
                    m.name(),
                    m.input().full_name()
                ));
                continue;
            }
            methods.push(MethodModel {
                name: m.name().to_string(),
                metrics: std::sync::Arc::new(crate::metrics::MethodMetrics::new(
                    service.full_name(),
                    m.name(),
                )),
                path,
                input: m.input(),
                output: m.output(),
                key_fields,
                streamed: m.is_server_streaming(),
            });
        }
        let passivation = passivation_timeout(e);
        let persistence_id = if e.persistence_id.is_empty() {
            service.name().to_string()
        } else {
            e.persistence_id.clone()
        };
        entities.push(std::sync::Arc::new(EntityModel {
            service,
            persistence_id,
            passivation,
            methods,
        }));
    }
    if problems.is_empty() {
        let encoded = bytes::Bytes::from(prost::Message::encode_to_vec(spec));
        Ok(UserFunctionModel {
            pool,
            entities,
            description,
            fingerprint: fingerprint_of(&encoded),
            encoded,
        })
    } else {
        Err(problems)
    }
}
