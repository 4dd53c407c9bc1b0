#!/usr/bin/env python3
"""Render the nginx_lb role's configuration for workers on this machine, and adapt it to run from a
folder (not /etc): the load balancer of the multi-GPU bench (bench/multi_gpu/run.sh).

Rendering is the role's own: ``ansible-playbook`` in local mode with ``tasks_from: render`` (as
tests/test_nginx_template.py does) when Ansible is available, else the same two templates
(ansible/roles/nginx_lb/templates/*.j2) with jinja2, the role defaults and the same inventory variables,
with Ansible's template settings (trim_blocks) and the two Ansible-only filters/tests the templates use
(``bool``, ``search``). tests/test_multi_gpu_units.py checks that both give byte-identical files.

Everything the run needs differently from a real load balancer is set through role variables in a
generated inventory (listen address and port, conf dir, log paths, user, no conf.d, temp paths through
``nginx_lb_http_extra``). Three paths are hard-coded in the template and are rewritten afterwards in the
copy nginx runs (``LOCAL_EDITS``): ``pid /run/nginx.pid``, ``include /etc/nginx/modules-enabled/*.conf`` and
``include /etc/nginx/mime.types`` (the last two point into the unpacked Debian package). The role's
unmodified output is kept in ``<prefix>/render/``.

    python bench/multi_gpu/render_nginx.py --prefix DIR --gpus 0,1 --base-port 9000 --listen-port 8080 \
        --nginx-etc /tmp/x/etc/nginx [--renderer auto|ansible|jinja2] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RENDER_PLAYBOOK = ROOT / "ansible" / "playbooks" / "render_nginx.yml"
ROLE = ROOT / "ansible" / "roles" / "nginx_lb"
LB_HOST = "lb"
GPU_HOST = "local"

# (what the role renders, what the local copy gets): each must occur exactly once in nginx.conf
LOCAL_EDITS = (
    (re.compile(r"^pid /run/nginx\.pid;$", re.M), "pid {prefix}/nginx.pid;"),
    (re.compile(r"^include /etc/nginx/modules-enabled/\*\.conf;$", re.M), "include {etc}/modules-enabled/*.conf;"),
    (re.compile(r"^(\s*)include /etc/nginx/mime\.types;$", re.M), r"\1include {etc}/mime.types;"),
)


def lb_vars(prefix: Path, listen_port: int, user: str | None = None) -> dict:
    """Role variables for an nginx that runs from ``prefix`` on loopback."""
    if user is None:
        user = "root" if os.geteuid() == 0 else "nobody"  # non-root: nginx ignores `user` (a warning)
    tmp = prefix / "tmp"
    return {
        "nginx_lb_listen_addresses": ["127.0.0.1"],
        "nginx_lb_listen_port": int(listen_port),
        "nginx_lb_conf_dir": str(prefix / "conf"),
        "nginx_lb_access_log": str(prefix / "access.log"),
        "nginx_lb_error_log": f"{prefix / 'error.log'} warn",
        "nginx_lb_include_conf_d": False,
        "nginx_lb_user": user,
        # the package's compiled-in temp paths are under /var/lib/nginx, which does not exist here
        "nginx_lb_http_extra": [f"{k}_temp_path {tmp / k};" for k in
                                ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")],
    }


def inventory(gpus: list[int], base_port: int, role_vars: dict, address: str = "127.0.0.1") -> dict:
    """An inventory like inventory/example: one load balancer (local connection) and one GPU host."""
    return {"all": {
        "children": {
            "tts_lb": {"hosts": {LB_HOST: {"ansible_connection": "local"}}},
            "tts_gpu": {"hosts": {GPU_HOST: {"ansible_host": address, "tts_gpus": list(gpus),
                                             "tts_gpu_base_port": int(base_port)}}},
        },
        "vars": dict(role_vars),
    }}


def find_ansible_playbook() -> str | None:
    for cand in (ROOT / ".venv-deploy" / "bin" / "ansible-playbook", shutil.which("ansible-playbook")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def render_ansible(inv: dict, out: Path, playbook_bin: str) -> dict[str, str]:
    """The role's offline render playbook (ansible/playbooks/render_nginx.yml), as tests/test_nginx_template.py runs it."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nginx_lb_render_") as td:
        td = Path(td)
        (td / "inv").mkdir()
        (td / "inv" / "hosts.yml").write_text(json.dumps(inv, indent=1))  # JSON is YAML
        bindir = str(Path(playbook_bin).parent)
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "ansible" / "roles"),
                   ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(td / "atmp"), ANSIBLE_REMOTE_TEMP=str(td / "rtmp"),
                   PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        env.pop("PYTHONPATH", None)  # the deploy venv has its own Python
        interp = Path(bindir) / "python"
        argv = [playbook_bin, "-i", str(td / "inv"), str(RENDER_PLAYBOOK), "-e", f"nginx_lb_render_dir={out}"]
        if interp.exists():
            argv += ["-e", f"ansible_python_interpreter={interp}"]
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError("ansible render failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])
    return {f.name: f.read_text() for f in sorted(out.iterdir()) if f.is_file()}


def _to_bool(v) -> bool:  # ansible's `bool` filter
    if isinstance(v, bool):
        return v
    if v is None:
        return False
    return str(v).strip().lower() in ("yes", "on", "1", "true", "y", "t")


def _render_value(env, v, ctx):
    """A role variable as Ansible evaluates it: one ``{{ expr }}`` keeps its type, other text is a string."""
    if not isinstance(v, str) or "{{" not in v:
        return v
    m = re.fullmatch(r"\{\{(.*)\}\}", v.strip(), re.S)
    if m and "{{" not in m.group(1):
        return env.compile_expression(m.group(1).strip(), undefined_to_none=False)(**ctx)
    return env.from_string(v).render(ctx)


def render_items() -> list[dict]:
    """The files tasks/render.yml writes: [{"src", "dest", "vars", "item"}] from its template task's loop."""
    import yaml

    tasks = yaml.safe_load((ROLE / "tasks" / "render.yml").read_text())
    for task in tasks:
        tmpl = task.get("ansible.builtin.template") or task.get("template")
        if tmpl:
            loop = task.get("loop") or task.get("with_items") or [None]
            return [{"src": tmpl["src"], "dest": tmpl["dest"], "vars": task.get("vars", {}), "item": item}
                    for item in loop]
    raise RuntimeError(f"no template task in {ROLE / 'tasks' / 'render.yml'}")


def render_jinja(inv: dict, out: Path, ansible_managed: str = "Ansible managed") -> dict[str, str]:
    """The role's render task with plain jinja2: the templates and loop of tasks/render.yml, role defaults <
    group `all` vars < group vars < host vars < task vars, as Ansible resolves them for the first tts_lb host.
    ``inv``: {"all": {"vars", "children": {group: {"vars", "hosts": {host: vars}}}}} (one level of groups)."""
    import jinja2
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")), trim_blocks=True,
                             lstrip_blocks=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["bool"] = _to_bool
    env.tests["search"] = lambda value, pattern: re.search(pattern, str(value)) is not None

    a = inv["all"]
    allvars = dict(a.get("vars", {}))
    groups: dict[str, list[str]] = {"all": [], "ungrouped": []}
    hostvars: dict[str, dict] = {}
    own: dict[str, dict] = {}
    for gname, g in a.get("children", {}).items():  # one level of groups, like inventory/example
        groups[gname] = list(g.get("hosts") or {})
        for h, hv in (g.get("hosts") or {}).items():
            if h not in groups["all"]:
                groups["all"].append(h)
            hostvars.setdefault(h, {**allvars, "inventory_hostname": h}).update(g.get("vars") or {})
            own.setdefault(h, {}).update(hv or {})
    for h, hv in own.items():  # host vars win over group vars
        hostvars[h].update(hv)
    lb = groups["tts_lb"][0]
    ctx = dict(yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()))
    ctx.update(hostvars[lb])
    ctx.update({"groups": groups, "hostvars": hostvars, "inventory_hostname": lb,
                "ansible_managed": ansible_managed, "nginx_lb_render_dir": str(out)})
    for k, v in list(ctx.items()):  # templated defaults, e.g. nginx_lb_config_host: "{{ inventory_hostname }}"
        ctx[k] = _render_value(env, v, ctx)
    texts = {}
    for it in render_items():
        c = dict(ctx, item=it["item"])
        c.update({k: _render_value(env, v, c) for k, v in it["vars"].items()})
        src = _render_value(env, it["src"], c)
        src = src if src.endswith(".j2") or (ROLE / "templates" / src).exists() else src + ".j2"
        dest = Path(_render_value(env, it["dest"], c)).name
        texts[dest] = env.get_template(src).render(c)
        (out / dest).write_text(texts[dest])
    return texts


def adapt(conf: str, prefix: Path, etc: Path) -> str:
    """The role's nginx.conf with the three hard-coded system paths pointed into ``prefix``/``etc``."""
    for pattern, repl in LOCAL_EDITS:
        conf, n = pattern.subn(repl.format(prefix=prefix, etc=etc), conf)
        if n != 1:
            raise RuntimeError(f"template changed: {pattern.pattern!r} matched {n} times")
    return conf


def render(prefix: Path, gpus: list[int], base_port: int, listen_port: int, etc: Path,
           renderer: str = "auto", compare: bool = False) -> dict:
    """Render into ``prefix``: render/ (the role's files as rendered), conf/upstream-servers.conf,
    nginx.conf (adapted), tmp/ (nginx temp dirs). Returns what was done."""
    prefix = Path(prefix).resolve()
    (prefix / "conf").mkdir(parents=True, exist_ok=True)
    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / k).mkdir(parents=True, exist_ok=True)
    inv = inventory(gpus, base_port, lb_vars(prefix, listen_port))
    (prefix / "inventory.json").write_text(json.dumps(inv, indent=1))
    playbook = find_ansible_playbook()
    info: dict = {"prefix": str(prefix), "gpus": list(gpus), "base_port": base_port, "listen_port": listen_port,
                  "ansible_playbook": playbook, "renders_equal": None}
    if renderer == "ansible" or (renderer == "auto" and playbook):
        if not playbook:
            raise RuntimeError("--renderer ansible: ansible-playbook not found")
        texts = render_ansible(inv, prefix / "render", playbook)
        info["renderer"] = "ansible"
        if compare:
            other = render_jinja(inv, prefix / "render-jinja2")
            info["renders_equal"] = other == texts
    else:
        texts = render_jinja(inv, prefix / "render")
        info["renderer"] = "jinja2"
        if compare and playbook:
            other = render_ansible(inv, prefix / "render-ansible", playbook)
            info["renders_equal"] = other == texts
    for name, text in texts.items():  # the included files (upstream members) go to nginx_lb_conf_dir
        if name != "nginx.conf":
            (prefix / "conf" / name).write_text(text)
    info["files"] = sorted(texts)
    (prefix / "nginx.conf").write_text(adapt(texts["nginx.conf"], prefix, Path(etc).resolve()))
    info["local_edits"] = [f"{p.pattern} -> {r.format(prefix=prefix, etc=etc)}" for p, r in LOCAL_EDITS]
    info["upstream_servers"] = [ln.split()[1].rstrip(";") for ln in texts["upstream-servers.conf"].splitlines()
                                if ln.startswith("server ")]
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render nginx_lb for local workers (see module docstring).")
    p.add_argument("--prefix", required=True, type=Path)
    p.add_argument("--gpus", required=True, help="comma-separated GPU indices (port = base + index)")
    p.add_argument("--base-port", type=int, default=9000)
    p.add_argument("--listen-port", type=int, default=8080)
    p.add_argument("--nginx-etc", type=Path, default=Path("/etc/nginx"), help="holds mime.types, modules-enabled/")
    p.add_argument("--renderer", choices=("auto", "ansible", "jinja2"), default="auto")
    p.add_argument("--compare", action="store_true", help="also render the other way and compare")
    a = p.parse_args(argv)
    info = render(a.prefix, [int(x) for x in a.gpus.split(",") if x.strip()], a.base_port, a.listen_port,
                  a.nginx_etc, a.renderer, a.compare)
    print(json.dumps(info, indent=1))
    return 0 if info["renders_equal"] in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
