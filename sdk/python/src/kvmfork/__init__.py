"""kvmfork: run untrusted code in throwaway KVM sandboxes.

>>> from kvmfork import Sandbox
>>> Sandbox().run("print(1 + 1)")
'2'
"""

__version__ = "0.1.0"

from .aio import AsyncSandbox  # noqa: E402
from .aio_session import AsyncCheckpoint, AsyncLiveSandbox, AsyncSandboxList  # noqa: E402
from .client import Sandbox, check_result  # noqa: E402
from .errors import (APIError, AuthError, BadRequest, CheckpointNotFound, ExecError,  # noqa: E402
                     KvmforkError, NetworkError, PartialFailure, ProtocolError, QuotaExceeded,
                     RateLimitError, SandboxEnded, SandboxError, SandboxExpired, SandboxNotFound,
                     SandboxTimeout, ServerBusy)
from .models import LANGUAGES, ErrorInfo, ExecRequest, ExecResult  # noqa: E402
from .session import (Checkpoint, LiveSandbox, SandboxInfo, SandboxList,  # noqa: E402
                      SessionExecResult)
from .tool import AsyncSandboxTool, SandboxTool, format_result  # noqa: E402

__all__ = [
    "__version__", "Sandbox", "AsyncSandbox", "check_result", "ExecRequest", "ExecResult",
    "ErrorInfo", "LANGUAGES", "SandboxTool", "AsyncSandboxTool", "format_result",
    "KvmforkError", "NetworkError", "ProtocolError", "APIError", "BadRequest", "AuthError",
    "RateLimitError", "ServerBusy", "SandboxError", "SandboxTimeout", "ExecError",
    "LiveSandbox", "AsyncLiveSandbox", "Checkpoint", "AsyncCheckpoint", "SandboxInfo",
    "SandboxList", "AsyncSandboxList", "SessionExecResult", "QuotaExceeded", "SandboxNotFound",
    "SandboxExpired", "SandboxEnded", "CheckpointNotFound", "PartialFailure",
]
