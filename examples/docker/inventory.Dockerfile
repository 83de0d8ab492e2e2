# The inventory example service (examples/java/inventory: the JDK's HttpServer plus JDBC).
# Build from the repository root:
#   docker build -f examples/docker/inventory.Dockerfile -t ebpf-bridge/inventory:0.1.0 .
# Plain javac, no Maven; the PostgreSQL JDBC driver is Debian's libpostgresql-jdbc-java.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      default-jdk-headless libpostgresql-jdbc-java \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY examples/java/inventory/Inventory.java ./
RUN javac -d classes Inventory.java
EXPOSE 8082
CMD ["java", "-cp", "classes:/usr/share/java/postgresql.jar", "Inventory", "--port", "8082", \
     "--jdbc", "jdbc:postgresql://postgres:5432/shop?user=postgres&password=example"]
