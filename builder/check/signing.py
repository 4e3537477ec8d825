"""Sign an artifact with a P-256 private key (OpenSSF model-signing, offline) and check signatures.

    builder sign artifacts/R --key private.pem                      # writes artifacts/R.sig
    builder verify --signature artifacts/R.sig --key public.pem artifacts/R
    python -m model_signing verify key artifacts/R --signature artifacts/R.sig --public_key public.pem
"""

import json
from pathlib import Path

from builder import atomic
from builder.errors import BuilderError, CheckFailed, Problem

SUFFIX = ".sig"  # the signature is a sibling of the artifact folder: outside its files and digest
CURVE = "secp256r1"  # NIST P-256


def signature_path(artifact: Path) -> Path:
    """Where a signature of artifact lives by default: <artifact>.sig beside the folder."""
    return artifact.parent / f"{artifact.name}{SUFFIX}"


def load_key(path: Path, private: bool):
    """A P-256 key from a PEM file; anything else is refused with the curve it has."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind = "private" if private else "public"
    try:
        data = path.read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as error:
        raise BuilderError(Problem(str(path), "--key", f"not a readable unencrypted {kind} key PEM ({error})"))
    curve = getattr(getattr(key, "curve", None), "name", type(key).__name__)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or curve != CURVE:
        raise BuilderError(Problem(str(path), "--key", f"{curve} key; a P-256 ({CURVE}) EC key is required"))
    return key


def sign(artifact: Path, key: Path, signature: Path | None = None) -> Path:
    """Sign every file of a verified artifact; write the signature atomically; returns its path."""
    import model_signing

    from builder.check.verify import verify

    load_key(key, private=True)
    verify(artifact)  # never sign bytes that are not the ones the manifest lists
    signature = signature or signature_path(artifact)
    with atomic.replacing(signature) as partial:
        model_signing.signing.Config().use_elliptic_key_signer(private_key=key).sign(artifact, partial)
    return signature


def key_hint(signature: Path) -> str | None:
    """sha256 of the signer's public key PEM, as the signature bundle records it (None if absent)."""
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        return bundle["verificationMaterial"]["publicKey"]["hint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check(artifact: Path, signature: Path, public_key: Path) -> list:
    """Problems (none when valid) of a signature over artifact, naming each file that differs."""
    import model_signing
    from cryptography.exceptions import InvalidSignature

    load_key(public_key, private=False)
    if not signature.is_file():
        return [Problem(str(signature), "--signature", "no such signature file")]
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(artifact, signature)
    except (ValueError, KeyError, TypeError, InvalidSignature) as error:
        return [Problem(str(signature), "", f"does not verify for {artifact.name}: {error or 'invalid signature'}")]
    return []


def verify_signature(artifact: Path, signature: Path, public_key: Path) -> None:
    """Raise CheckFailed unless signature is a valid signature of artifact by public_key."""
    problems = check(artifact, signature, public_key)
    if problems:
        raise CheckFailed(problems)
