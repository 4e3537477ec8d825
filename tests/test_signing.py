"""Signing: model-signing (private-key mode, P-256) over every file; the signature sits beside the artifact."""

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from builder.check import signing
from builder.errors import BuilderError, CheckFailed
from builder.check.verify import verify
from test_verify import artifact, copy  # noqa: F401  (fixtures: a built tiny artifact, a fresh copy)


def write_keys(folder, curve=ec.SECP256R1):
    """A fresh key pair as PEM files; returns (private, public) paths."""
    key = ec.generate_private_key(curve())
    private, public = folder / "private.pem", folder / "public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("keys"))


def test_a_signature_sits_beside_the_artifact_and_verify_does_not_see_it(copy, keys):
    signature = signing.sign(copy, keys[0])
    assert signature == copy.parent / "tiny-llama-fp8-dynamic.sig" and signature.is_file()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["tiny-llama-fp8-dynamic", "tiny-llama-fp8-dynamic.sig"]
    assert not [path for path in copy.rglob("*") if path.suffix == ".sig"]
    assert verify(copy)["files"] == len(list(copy.iterdir())) - 1  # every file but manifest.json
    signing.verify_signature(copy, signature, keys[1])


def test_the_model_signing_cli_accepts_our_signature(copy, keys):
    signature = signing.sign(copy, keys[0])
    command = [sys.executable, "-m", "model_signing", "verify", "key", str(copy),
               "--signature", str(signature), "--public_key", str(keys[1])]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0 and "Verification succeeded" in result.stdout, result.stderr
    (copy / "config.json").write_text("{}")
    assert subprocess.run(command, capture_output=True, text=True).returncode != 0


def test_a_signature_by_another_key_does_not_verify(copy, keys, tmp_path):
    signature = signing.sign(copy, keys[0])
    _, stranger = write_keys(tmp_path)
    with pytest.raises(CheckFailed, match="Key mismatch"):
        signing.verify_signature(copy, signature, stranger)


def test_sign_refuses_a_key_that_is_not_p256(copy, tmp_path):
    private, _ = write_keys(tmp_path, curve=ec.SECP384R1)
    with pytest.raises(BuilderError, match="secp384r1 key; a P-256"):
        signing.sign(copy, private)
    assert not signing.signature_path(copy).exists()


def test_sign_refuses_an_artifact_that_does_not_verify(copy, keys):
    (copy / "config.json").write_text("{}")
    with pytest.raises(CheckFailed, match="config.json: changed"):
        signing.sign(copy, keys[0])
    assert not signing.signature_path(copy).exists()


def test_sign_and_verify_signature_on_the_command_line(tiny_repo, copy, keys, tmp_path):
    assert tiny_repo.run("sign", str(copy), "--key", str(keys[0])).returncode == 0
    assert tiny_repo.run("verify", str(copy), "--key", str(keys[1])).returncode == 0
    _, stranger = write_keys(tmp_path)
    result = tiny_repo.run("verify", str(copy), "--signature", str(signing.signature_path(copy)),
                           "--key", str(stranger))
    assert result.returncode == 1 and "tiny-llama-fp8-dynamic.sig" in result.stderr
