"""protos.miniinfer: generated protobuf modules, one subpackage per API version."""
