# Sourced by the bench scripts that compare sluice with a peer: the servers they
# start the same way.

# free_port: a loopback port nothing listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# write_sluice_config FILE PORT: sluice on the memory store with one limit, `api`.
write_sluice_config() {
    cat > "$1" <<YAML
listen: 127.0.0.1:$2
storage: {backend: memory, max_keys: 1000000}
limits:
  api: {rate: 100/second}
YAML
}

# write_nginx_config FILE SCRATCH PORT: nginx, one worker per core, answering every
# request with a fixed 200 and a JSON body the size of a short decision.
write_nginx_config() {
    cat > "$1" <<NGINX
worker_processes 2;
pid $2/nginx.pid;
error_log $2/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$3;
    location / { default_type application/json; return 200 '{"allowed":true,"retry_after_ms":0,"degraded":false,"results":[]}'; }
  }
}
NGINX
}

# write_upstream_config FILE SCRATCH PORT: the proxy benchmarks' upstream, one nginx
# worker answering a small fixed 200 with keep-alive.
write_upstream_config() {
    cat > "$1" <<NGINX
worker_processes 1;
pid $2/upstream.pid;
error_log $2/upstream-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$3;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
NGINX
}

# write_proxy_config FILE PORT UPSTREAM_PORT [THREADS]: sluice as a reverse proxy in
# front of 127.0.0.1:UPSTREAM_PORT, one limit on {client_ip} far above any offered load
# (every request is decided and forwarded).
write_proxy_config() {
    cat > "$1" <<YAML
listen: 127.0.0.1:$2
http: {threads: ${4:-0}}
storage: {backend: memory, max_keys: 1000000}
limits:
  per_ip: {rate: 100000/second}
routes:
  - match: {path: "/*"}
    limits:
      - {limit: per_ip, key: "{client_ip}"}
proxy:
  upstream: http://127.0.0.1:$3
YAML
}
