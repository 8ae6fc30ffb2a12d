"""A stock gRPC server-reflection client against latticed's front-end.

    python3 reflection_client.py HOST:PORT SERVICE METHOD

Uses grpcio-reflection (PyPI), as a Python developer would: lists the services the server
reflects, then resolves SERVICE through reflection alone and describes METHOD. Prints
`services <names...>` and `method <full name> <input type> <output type>`.
"""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    addr, service, method = sys.argv[1:4]
    with grpc.insecure_channel(addr) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        print("services", " ".join(db.get_services()))
        pool = DescriptorPool(db)
        m = pool.FindServiceByName(service).FindMethodByName(method)
        print("method", m.full_name, m.input_type.full_name, m.output_type.full_name)


if __name__ == "__main__":
    main()
