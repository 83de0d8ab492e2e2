// Pricing: the example pricing service. Plain net/http, HTTP/2 over cleartext (h2c, prior
// knowledge or Upgrade) through golang.org/x/net/http2/h2c; no ebpf-bridge code at all.
//
//	GET /price/<sku>  ->  {"sku": "...", "cents": N, "currency": "EUR"}
//
//	pricing --port 8083 [--ready-file PATH]
//
// Prices are computed from the sku so every instance answers the same; skus containing
// "fail" answer 500, so the demo shows error spans.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"log"
	"net"
	"net/http"
	"os"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func price(w http.ResponseWriter, r *http.Request) {
	sku := strings.TrimPrefix(r.URL.Path, "/price/")
	w.Header().Set("Content-Type", "application/json")
	if sku == "" || strings.Contains(sku, "fail") {
		w.WriteHeader(http.StatusInternalServerError)
		json.NewEncoder(w).Encode(map[string]string{"error": "no price for " + sku})
		return
	}
	cents := 500 + int(crc32.ChecksumIEEE([]byte(sku))%9500)
	json.NewEncoder(w).Encode(map[string]any{"sku": sku, "cents": cents, "currency": "EUR"})
}

// writeReady writes the port to path atomically (tmp file + rename).
func writeReady(path string, port int) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(fmt.Sprint(port)), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func main() {
	port := flag.Int("port", 8083, "TCP port on 127.0.0.1 (0: any free port)")
	ready := flag.String("ready-file", "", "write the port here once listening")
	flag.Parse()

	mux := http.NewServeMux()
	mux.HandleFunc("/price/", price)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		log.Fatalf("pricing: %v", err)
	}
	if *ready != "" {
		if err := writeReady(*ready, ln.Addr().(*net.TCPAddr).Port); err != nil {
			log.Fatalf("pricing: ready file: %v", err)
		}
	}
	srv := &http.Server{Handler: h2c.NewHandler(mux, &http2.Server{})}
	log.Fatal(srv.Serve(ln))
}
