//! latticed's protobuf definitions and the code generated from them.
//!
//! This crate owns every `.proto` file of the project and nothing else: no logic lives here.
//!
//! - [`cloudstate`] and [`cloudstate::crdt`]: the CloudState protocol spoken with user functions
//!   (`proto/cloudstate/*.proto`, written from the protocol spec with the reference field numbers),
//!   with the options user functions put in their descriptors (`entity_key`,
//!   `legacy_entity_key`, `eventing`) and [`google::api`]'s HTTP rules.
//! - [`latticed::crdt`]: latticed's own encoding of CRDT values and deltas between daemons.
//! - [`latticed::peer`]: the replication protocol between daemons.
//! - [`latticed::route`]: service advertisement and forwarded commands between daemons.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of all of the above.

#![allow(missing_docs)]
#![allow(clippy::all)]
#![allow(nonstandard_style)]

/// The CloudState protocol (package `cloudstate`).
pub mod cloudstate {
    tonic::include_proto!("cloudstate");

    /// The CloudState CRDT entity protocol (package `cloudstate.crdt`).
    pub mod crdt {
        tonic::include_proto!("cloudstate.crdt");
    }
}

/// Google API annotations (package `google.api`): HTTP transcoding rules.
pub mod google {
    /// package `google.api`
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

/// latticed's own protocols (package `latticed`).
pub mod latticed {
    /// Peer encoding of CRDT values and deltas (package `latticed.crdt`).
    pub mod crdt {
        tonic::include_proto!("latticed.crdt");
    }

    /// Replication protocol between daemons (package `latticed.peer`).
    pub mod peer {
        tonic::include_proto!("latticed.peer");
    }

    /// Routing protocol between daemons (package `latticed.route`): which node serves which
    /// service, and forwarded commands.
    pub mod route {
        tonic::include_proto!("latticed.route");
    }

    /// Registration of user functions at run time (package `latticed.admin.v1`).
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("latticed.admin.v1");
        }
    }
}

/// `google.protobuf` well-known types used by the generated code.
pub use prost_types as wkt;

/// Encoded `FileDescriptorSet` of every `.proto` in this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptors");
