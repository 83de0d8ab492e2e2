// Inventory: the example inventory service. The JDK's built-in HTTP server plus JDBC to
// PostgreSQL; no ebpf-bridge code at all.
//
//   GET /stock/<sku>  ->  {"sku": "...", "count": N}
//
//   java -cp build:/usr/share/java/postgresql.jar Inventory --port 8082 [--ready-file PATH]
//        [--jdbc jdbc:postgresql://127.0.0.1:5432/postgres?user=postgres]
//
// With --jdbc, stock lives in a "stock" table (created and seeded at start if missing) and
// every request runs one SELECT (a sku with no row gets the computed default); without it,
// stock is computed in memory. Skus containing
// "fail" answer 500, so the demo shows error spans.

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.Executors;
import java.util.zip.CRC32;

public final class Inventory {
    private static final int POOL = 4;
    private static String jdbcUrl;
    /** A tiny connection pool: connections open lazily, on first use, and are reused. */
    private static final BlockingQueue<Connection> idle = new ArrayBlockingQueue<>(POOL);

    private Inventory() {}

    private static int computed(String sku) {
        CRC32 crc = new CRC32();
        crc.update(sku.getBytes(StandardCharsets.UTF_8));
        return (int) (crc.getValue() % 7);
    }

    private static Connection borrow() throws SQLException {
        Connection c = idle.poll();
        return c != null && !c.isClosed() ? c : DriverManager.getConnection(jdbcUrl);
    }

    private static void giveBack(Connection c) throws SQLException {
        if (!idle.offer(c)) {
            c.close();
        }
    }

    private static int fromDatabase(String sku) throws SQLException {
        Connection c = borrow();
        try (PreparedStatement st = c.prepareStatement("SELECT count FROM stock WHERE sku = ?")) {
            st.setString(1, sku);
            try (ResultSet rs = st.executeQuery()) {
                int count = rs.next() ? rs.getInt(1) : computed(sku);
                giveBack(c);
                return count;
            }
        } catch (SQLException e) {
            c.close();
            throw e;
        }
    }

    private static void seed() throws SQLException {
        try (Connection c = DriverManager.getConnection(jdbcUrl);
             Statement st = c.createStatement()) {
            st.execute("CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY, count int NOT NULL)");
            try (PreparedStatement ins = c.prepareStatement(
                    "INSERT INTO stock VALUES (?, ?) ON CONFLICT (sku) DO NOTHING")) {
                for (int i = 0; i < 100; i++) {
                    String sku = "sku-" + i;
                    ins.setString(1, sku);
                    ins.setInt(2, computed(sku));
                    ins.addBatch();
                }
                ins.executeBatch();
            }
        }
    }

    private static void handle(HttpExchange ex) throws IOException {
        String path = ex.getRequestURI().getPath();
        String sku = path.substring(path.lastIndexOf('/') + 1);
        int status;
        String body;
        if (!"GET".equals(ex.getRequestMethod()) || !path.startsWith("/stock/")) {
            status = 404;
            body = "{\"error\": \"not found\"}";
        } else if (sku.contains("fail")) {
            status = 500;
            body = "{\"error\": \"inventory database unavailable\"}";
        } else {
            try {
                int count = jdbcUrl == null ? computed(sku) : fromDatabase(sku);
                status = 200;
                body = "{\"sku\": \"" + sku.replace("\"", "") + "\", \"count\": " + count + "}";
            } catch (SQLException e) {
                status = 503;
                body = "{\"error\": \"database: " + e.getSQLState() + "\"}";
            }
        }
        byte[] raw = body.getBytes(StandardCharsets.UTF_8);
        ex.getResponseHeaders().set("Content-Type", "application/json");
        ex.sendResponseHeaders(status, raw.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(raw);
        }
    }

    public static void main(String[] args) throws Exception {
        int port = 8082;
        String ready = null;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--port" -> port = Integer.parseInt(args[++i]);
                case "--ready-file" -> ready = args[++i];
                case "--jdbc" -> jdbcUrl = args[++i];
                default -> {
                    System.err.println("usage: Inventory [--port N] [--ready-file PATH] [--jdbc URL]");
                    System.exit(2);
                }
            }
        }
        if (jdbcUrl != null) {
            seed();
        }
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 64);
        server.createContext("/", Inventory::handle);
        server.setExecutor(Executors.newFixedThreadPool(8));
        server.start();
        if (ready != null) {
            // Write then rename, so a watcher never reads a half-written file.
            Path tmp = Path.of(ready + ".tmp");
            Files.writeString(tmp, Integer.toString(server.getAddress().getPort()));
            Files.move(tmp, Path.of(ready), StandardCopyOption.ATOMIC_MOVE);
        }
    }
}
