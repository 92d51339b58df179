from google.protobuf.internal.encoder import _VarintBytes

from shim.protowire import encode_varint


def test_varints_match_protobufs_own_encoder():
    for value in [0, 1, 127, 128, 300, 16383, 16384, 2**32 - 1, 2**35 + 7, 2**63 - 1, 2**64 - 1]:
        assert encode_varint(value) == _VarintBytes(value), value
