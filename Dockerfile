# One image with the three services (command-api, projector, query-api);
# docker-compose.yml runs each with its own command.
FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p command-api -p projector -p query-api \
 && mkdir /out \
 && cp target/release/command-api target/release/projector target/release/query-api /out/

FROM debian:bookworm-slim AS runtime
# curl is the health checks' client.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 ticketing
COPY --from=build /out/ /usr/local/bin/
USER ticketing
EXPOSE 8081 8082 8083
CMD ["command-api"]
