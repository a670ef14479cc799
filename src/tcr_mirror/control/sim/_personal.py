"""Simulated TCR Personal edition actions (namespaces, repositories, tags).

A Personal user must be initialised (``CreateUserPersonal``) before
namespaces and repositories can be made; until then those actions answer
``ResourceNotFound.ErrNoUser``. Namespaces are global across all users, so
the account also sees names held by others (``ErrNamespaceExist``) and
names TCR keeps (``ErrNamespaceReserved``).

Tags cannot be pushed through this API; tests add them with
:func:`push_tag`. UNCONFIRMED choices: deleting a namespace deletes its
repositories; the batch deletes skip names that do not exist; more than 20
repositories in one batch is ``InvalidParameter.ErrTooLarge``; a missing
tag is ``ResourceNotFound.ErrNoTag``; the quotas are 10 namespaces and 500
repositories.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from ._schema import INTEGER, STRING, ListOf, SimError, opt, req
from ._state import PersonalAccount, SimState

__all__ = ["ACTIONS", "push_tag"]

_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_-]{3,29}")
_REPO = re.compile(r"([a-z0-9][a-z0-9_-]{3,29})/([a-z0-9][a-z0-9._/-]{0,199})")
_CST = datetime.timezone(datetime.timedelta(hours=8))
_NAMESPACE_QUOTA, _REPO_QUOTA, _BATCH_LIMIT = 10, 500, 20
_SERVER = "ccr.ccs.tencentyun.com"


def _plain_time(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, tz=_CST).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


def _cst_time(moment: float) -> str:
    local = datetime.datetime.fromtimestamp(moment, tz=_CST)
    return local.strftime("%Y-%m-%d %H:%M:%S +0800 CST")


def _user(state: SimState) -> PersonalAccount:
    if state.personal.password is None:
        raise SimError(
            "ResourceNotFound.ErrNoUser", "The Personal user is not created."
        )
    return state.personal


def _password(value: str) -> str:
    if not 8 <= len(value) <= 16:
        raise SimError("InvalidParameterValue", "Password must be 8-16 characters.")
    return value


def _repo_name(account: PersonalAccount, name: str, missing: str) -> str:
    match = _REPO.fullmatch(name)
    if match is None:
        raise SimError("InvalidParameterValue", f"`{name}` is not `namespace/repo`.")
    if match[1] not in account.namespaces:
        raise SimError(missing, f"Namespace `{match[1]}` is not yours.")
    return name


def _existing_repo(account: PersonalAccount, name: str) -> dict[str, Any]:
    _repo_name(account, name, "InternalError.ErrUnauthorized")
    repo = account.repos.get(name)
    if repo is None:
        raise SimError("ResourceNotFound.ErrNoRepo", f"Repository `{name}` not found.")
    return repo


def push_tag(state: SimState, repo_name: str, tag: str, digest: str) -> None:
    """Record a pushed tag (test helper; the API has no push).

    Raises:
        SimError: The repository does not exist.
    """
    repo = _existing_repo(state.personal, repo_name)
    repo["tags"][tag] = {"digest": digest, "pushed_at": state.now()}


def create_user(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    if state.personal.password is not None:
        raise SimError("InvalidParameter.ErrUserExist", "The user already exists.")
    state.personal.password = _password(p["Password"])
    return {}


def modify_password(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    _user(state).password = _password(p["Password"])
    return {}


def create_namespace(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account, name = _user(state), p["Namespace"]
    if not _NAMESPACE.fullmatch(name):
        raise SimError("InvalidParameterValue", "Namespace must be 4-30 of a-z0-9_-.")
    if name in account.reserved:
        raise SimError(
            "InvalidParameter.ErrNamespaceReserved", f"`{name}` is reserved."
        )
    if name in account.namespaces or name in account.foreign:
        raise SimError("InvalidParameter.ErrNamespaceExist", f"`{name}` exists.")
    if len(account.namespaces) >= _NAMESPACE_QUOTA:
        raise SimError("LimitExceeded.ErrNamespaceMaxLimit", "Namespace quota reached.")
    account.namespaces[name] = state.now()
    return {}


def delete_namespace(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account, name = _user(state), p["Namespace"]
    if name not in account.namespaces:
        raise SimError("ResourceNotFound.ErrNoNamespace", f"No namespace `{name}`.")
    del account.namespaces[name]
    for repo in [r for r in account.repos if r.startswith(name + "/")]:
        del account.repos[repo]
    return {}


def describe_namespaces(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account = _user(state)
    names = sorted(n for n in account.namespaces if p["Namespace"] in n)
    page = names[p["Offset"] : p["Offset"] + p["Limit"]]
    return {
        "Data": {
            "NamespaceCount": len(names),
            "NamespaceInfo": [
                {
                    "Namespace": name,
                    "CreationTime": _plain_time(account.namespaces[name]),
                    "RepoCount": sum(r.startswith(name + "/") for r in account.repos),
                }
                for name in page
            ],
        }
    }


def validate_namespace(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account, name = state.personal, p["Namespace"]
    exists = name in account.namespaces or name in account.foreign
    return {"Data": {"IsExist": exists, "IsPreserved": name in account.reserved}}


def create_repository(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account = _user(state)
    name = _repo_name(account, p["RepoName"], "InvalidParameter.ErrNSMisMatch")
    if name in account.repos:
        raise SimError("InvalidParameter.ErrRepoExist", f"`{name}` already exists.")
    if len(account.repos) >= _REPO_QUOTA:
        raise SimError("LimitExceeded.ErrRepoMaxLimit", "Repository quota reached.")
    if p.get("Public", 0) not in (0, 1):
        raise SimError("InvalidParameterValue", "Public must be 0 or 1.")
    account.repos[name] = {
        "public": p.get("Public", 0),
        "description": p.get("Description", ""),
        "created": state.now(),
        "tags": {},
    }
    return {}


def delete_repository(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account = _user(state)
    _existing_repo(account, p["RepoName"])
    del account.repos[p["RepoName"]]
    return {}


def batch_delete_repositories(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account = _user(state)
    if len(p["RepoNames"]) > _BATCH_LIMIT:
        raise SimError("InvalidParameter.ErrTooLarge", f"At most {_BATCH_LIMIT} names.")
    for name in p["RepoNames"]:
        _repo_name(account, name.strip(), "InternalError.ErrUnauthorized")
    for name in p["RepoNames"]:
        account.repos.pop(name.strip(), None)
    return {}


def describe_repositories(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    account = _user(state)
    names = sorted(n for n in account.repos if p.get("RepoName", "") in n)
    offset, limit = p.get("Offset", 0), min(p.get("Limit", 20), 100)
    info = [
        {
            "RepoName": name,
            "RepoType": "QCLOUD HUB",
            "TagCount": len(account.repos[name]["tags"]),
            "Public": account.repos[name]["public"],
            "Description": account.repos[name]["description"],
            "CreationTime": _plain_time(account.repos[name]["created"]),
        }
        for name in names[offset : offset + limit]
    ]
    return {"Data": {"TotalCount": len(names), "RepoInfo": info, "Server": _SERVER}}


def describe_images(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    repo = _existing_repo(_user(state), p["RepoName"])
    tags = sorted(t for t in repo["tags"] if p.get("Tag", "") in t)
    offset, limit = p.get("Offset", 0), min(p.get("Limit", 20), 100)
    info = [
        {
            "TagName": tag,
            "TagId": repo["tags"][tag]["digest"],
            "PushTime": _plain_time(repo["tags"][tag]["pushed_at"]),
        }
        for tag in tags[offset : offset + limit]
    ]
    return {
        "Data": {
            "TagCount": len(tags),
            "TagInfo": info,
            "Server": _SERVER,
            "RepoName": p["RepoName"],
        }
    }


def delete_image(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    repo = _existing_repo(_user(state), p["RepoName"])
    if p["Tag"] not in repo["tags"]:
        raise SimError("ResourceNotFound.ErrNoTag", f"Tag `{p['Tag']}` not found.")
    del repo["tags"][p["Tag"]]
    return {}


def batch_delete_images(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    repo = _existing_repo(_user(state), p["RepoName"])
    for tag in p["Tags"]:
        repo["tags"].pop(tag, None)
    return {}


def manage_lifecycle(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    if p["Type"] not in ("global_keep_last_days", "global_keep_last_nums"):
        raise SimError(
            "InvalidParameterValue",
            "Type must be global_keep_last_days or global_keep_last_nums.",
        )
    if p["Val"] <= 0:
        raise SimError("InvalidParameterValue", "Val must be positive.")
    # One global policy at a time: setting a type replaces the other.
    state.personal.lifecycle = {p["Type"]: (p["Val"], state.now())}
    return {}


def delete_lifecycle(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    state.personal.lifecycle.clear()
    return {}


def describe_lifecycle(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    strategies = [
        {
            "Username": state.config.owner_uin,
            "RepoName": "",
            "Type": kind,
            "Value": value,
            "Valid": 1,
            "CreationTime": _cst_time(created),
        }
        for kind, (value, created) in state.personal.lifecycle.items()
    ]
    return {"Data": {"TotalCount": len(strategies), "StrategyInfo": strategies}}


_PAGE = {"Offset": opt(INTEGER), "Limit": opt(INTEGER)}

ACTIONS = {
    "CreateUserPersonal": ({"Password": req(STRING)}, create_user, 20),
    "ModifyUserPasswordPersonal": ({"Password": req(STRING)}, modify_password, 20),
    "CreateNamespacePersonal": ({"Namespace": req(STRING)}, create_namespace, 20),
    "DeleteNamespacePersonal": ({"Namespace": req(STRING)}, delete_namespace, 20),
    "DescribeNamespacePersonal": (
        {"Namespace": req(STRING), "Limit": req(INTEGER), "Offset": req(INTEGER)},
        describe_namespaces,
        20,
    ),
    "ValidateNamespaceExistPersonal": (
        {"Namespace": req(STRING)},
        validate_namespace,
        20,
    ),
    "CreateRepositoryPersonal": (
        {"RepoName": req(STRING), "Public": opt(INTEGER), "Description": opt(STRING)},
        create_repository,
        20,
    ),
    "DeleteRepositoryPersonal": ({"RepoName": req(STRING)}, delete_repository, 20),
    "BatchDeleteRepositoryPersonal": (
        {"RepoNames": req(ListOf(STRING))},
        batch_delete_repositories,
        20,
    ),
    "DescribeRepositoryOwnerPersonal": (
        {**_PAGE, "RepoName": opt(STRING)},
        describe_repositories,
        100,
    ),
    "DescribeImagePersonal": (
        {"RepoName": req(STRING), **_PAGE, "Tag": opt(STRING)},
        describe_images,
        100,
    ),
    "DeleteImagePersonal": (
        {"RepoName": req(STRING), "Tag": req(STRING)},
        delete_image,
        20,
    ),
    "BatchDeleteImagePersonal": (
        {"RepoName": req(STRING), "Tags": req(ListOf(STRING))},
        batch_delete_images,
        20,
    ),
    "ManageImageLifecycleGlobalPersonal": (
        {"Type": req(STRING), "Val": req(INTEGER)},
        manage_lifecycle,
        20,
    ),
    "DeleteImageLifecycleGlobalPersonal": ({}, delete_lifecycle, 20),
    "DescribeImageLifecycleGlobalPersonal": ({}, describe_lifecycle, 20),
}
