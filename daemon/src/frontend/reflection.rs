//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) over the discovered files.
//!
//! Answers from the user functions' current descriptor pools (a rediscovered spec is seen at
//! once). `ListServices` answers the reflection service itself followed by the discovered
//! services sorted, as the reference proxy (conformance item 3). A file is answered with its
//! transitive imports. An unknown file or symbol answers an empty `FileDescriptorResponse`, as
//! the reference proxy does, not an error.

use std::collections::BTreeSet;
use std::pin::Pin;

use prost::Message;
use prost_reflect::{DescriptorPool, FileDescriptor};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::v1 as pb;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha as pba;

use super::Frontend;

/// The v1 service name.
pub const V1: &str = "grpc.reflection.v1.ServerReflection";
/// The v1alpha service name.
pub const V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Reflection over the discovered descriptors, answering as the service `name`.
#[derive(Clone)]
pub struct Reflection {
    frontend: Frontend,
    name: &'static str,
}

/// `grpc.reflection.v1`.
pub fn v1(frontend: Frontend) -> pb::server_reflection_server::ServerReflectionServer<Reflection> {
    pb::server_reflection_server::ServerReflectionServer::new(Reflection { frontend, name: V1 })
}

/// `grpc.reflection.v1alpha`.
pub fn v1alpha(
    frontend: Frontend,
) -> pba::server_reflection_server::ServerReflectionServer<Reflection> {
    pba::server_reflection_server::ServerReflectionServer::new(Reflection {
        frontend,
        name: V1ALPHA,
    })
}

impl Reflection {
    fn pools(&self) -> Vec<DescriptorPool> {
        self.frontend
            .backends()
            .iter()
            .map(|e| e.model().pool.clone())
            .collect()
    }

    /// The answer to one request.
    fn answer(&self, req: pb::ServerReflectionRequest) -> pb::ServerReflectionResponse {
        let pools = self.pools();
        let response = match &req.message_request {
            Some(MessageRequest::ListServices(_)) => {
                let mut names = BTreeSet::new();
                for e in self.frontend.backends().iter() {
                    for entity in &e.model().entities {
                        names.insert(entity.service.full_name().to_string());
                    }
                }
                let service = std::iter::once(self.name.to_string())
                    .chain(names)
                    .map(|name| pb::ServiceResponse { name })
                    .collect();
                MessageResponse::ListServicesResponse(pb::ListServiceResponse { service })
            }
            Some(MessageRequest::FileByFilename(name)) => {
                files(pools.iter().find_map(|p| p.get_file_by_name(name)))
            }
            Some(MessageRequest::FileContainingSymbol(symbol)) => {
                files(pools.iter().find_map(|p| file_of_symbol(p, symbol)))
            }
            Some(MessageRequest::FileContainingExtension(ext)) => {
                files(pools.iter().find_map(|p| {
                    p.get_message_by_name(&ext.containing_type)?
                        .get_extension(u32::try_from(ext.extension_number).ok()?)
                        .map(|e| e.parent_file())
                }))
            }
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => {
                match pools.iter().find_map(|p| p.get_message_by_name(name)) {
                    Some(m) => {
                        MessageResponse::AllExtensionNumbersResponse(pb::ExtensionNumberResponse {
                            base_type_name: name.clone(),
                            extension_number: m
                                .extensions()
                                .filter_map(|e| i32::try_from(e.number()).ok())
                                .collect(),
                        })
                    }
                    None => MessageResponse::ErrorResponse(pb::ErrorResponse {
                        error_code: tonic::Code::NotFound as i32,
                        error_message: format!("unknown type {name}"),
                    }),
                }
            }
            None => MessageResponse::ErrorResponse(pb::ErrorResponse {
                error_code: tonic::Code::InvalidArgument as i32,
                error_message: "empty request".into(),
            }),
        };
        pb::ServerReflectionResponse {
            valid_host: req.host.clone(),
            original_request: Some(req),
            message_response: Some(response),
        }
    }
}

/// The file defining `symbol` (a package-qualified message, enum, service, method, field,
/// enum value or extension name).
fn file_of_symbol(pool: &DescriptorPool, symbol: &str) -> Option<FileDescriptor> {
    let symbol = symbol.trim_start_matches('.');
    if let Some(m) = pool.get_message_by_name(symbol) {
        return Some(m.parent_file());
    }
    if let Some(e) = pool.get_enum_by_name(symbol) {
        return Some(e.parent_file());
    }
    if let Some(s) = pool.get_service_by_name(symbol) {
        return Some(s.parent_file());
    }
    if let Some(x) = pool.get_extension_by_name(symbol) {
        return Some(x.parent_file());
    }
    // a member (method, field, enum value): its parent
    let (parent, _) = symbol.rsplit_once('.')?;
    if parent.is_empty() {
        return None;
    }
    if let Some(s) = pool.get_service_by_name(parent) {
        return Some(s.parent_file());
    }
    if let Some(m) = pool.get_message_by_name(parent) {
        return Some(m.parent_file());
    }
    pool.get_enum_by_name(parent).map(|e| e.parent_file())
}

/// `file` and its transitive imports, the file first; none: an empty response.
fn files(file: Option<FileDescriptor>) -> MessageResponse {
    let mut out = Vec::new();
    if let Some(file) = file {
        let mut seen = BTreeSet::new();
        let mut todo = vec![file];
        while let Some(f) = todo.pop() {
            if !seen.insert(f.name().to_string()) {
                continue;
            }
            out.push(f.encode_to_vec());
            todo.extend(f.dependencies());
        }
    }
    MessageResponse::FileDescriptorResponse(pb::FileDescriptorResponse {
        file_descriptor_proto: out,
    })
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = ResponseStream<pb::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<pb::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let this = self.clone();
        let out = request.into_inner().map(move |r| r.map(|r| this.answer(r)));
        Ok(Response::new(Box::pin(out)))
    }
}

/// Converts between the two versions' messages (the same wire format).
fn convert<A: Message, B: Message + Default>(a: &A) -> Result<B, Status> {
    B::decode(a.encode_to_vec().as_slice()).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl pba::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = ResponseStream<pba::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<pba::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let this = self.clone();
        let out = request.into_inner().map(move |r| {
            let r: pb::ServerReflectionRequest = convert(&r?)?;
            convert(&this.answer(r))
        });
        Ok(Response::new(Box::pin(out)))
    }
}
